"""Study files for `nemo-adapt compare`: which adaptation strategies to compare, on which fixed dataset, how
to evaluate them, and the deployment scenarios to recommend one for.

A study is YAML data (see `recipes/studies/`):

    name: triage                      # names the output directory (runs/studies/<name>) and the report
    dataset:                          # the fixed dataset version every candidate must train and test on
      version: triage-v1              # a label, recorded with the files' sha256 in matrix.json
      train: datasets/triage/train.jsonl
      validation: datasets/triage/validation.jsonl
      test: datasets/triage/test.jsonl
    overrides: [logging.wandb_mode=offline]   # recipe overrides for every trained candidate
    budget: {max_steps: 100}          # optional: the same number of steps for every trained candidate
    evaluation:
      few_shot: 4                     # the prompt-only baselines: zero-shot and 4-shot
      suites: [suites/general_knowledge.yaml, suites/safety.yaml]
      forgetting: datasets/general/heldout.jsonl
      latency_tokens: 32              # generated tokens per row for the inference cost (0: not measured)
      max_examples: null              # test examples per candidate (null: the whole split)
    target: {gpu: h100-80gb, nodes: 1, gpus_per_node: 1}   # the cluster GPU-hours are estimated for
    candidates:
      - {name: prompt_only, baseline: true, recipe: recipes/smollm2_135m_lora.yaml}
      - {name: lora, recipe: recipes/smollm2_135m_lora.yaml}
      - {name: ia3, recipe: recipes/smollm2_135m_lora.yaml, peft: {method: ia3}, overrides: [optim.lr=3e-3]}
      - {name: full, recipe: recipes/smollm2_135m_full.yaml}
    scenarios:
      - name: faq_bot
        description: low-risk FAQ bot
        min_gain: 0.0                 # required gain of the task metric over the prompt-only baseline, judged
                                      # on the candidate's 95% lower bound
        min_quality: 0.5              # the task metric's lower bound must reach this (optional)
        max_latency_overhead: 0.25    # decode time per token relative to the base, minus 1 (optional)
        variants: 1                   # adapted variants served side by side
        gpu_hours: 10                 # training budget on `target` for all variants (optional)
        max_forgetting: null          # general-text loss increase, nats/token, upper bound (optional)
        suites: []                    # regression suites (by name) that must pass
        risk: low                     # low | regulated | high: recorded; the gates are the keys above
        prefer: cost                  # among candidates that meet every gate: cost | quality

A candidate's recipe is loaded as `nemo-adapt run` loads it; `peft:` replaces the recipe's whole `peft`
section (an override cannot drop another method's keys); `overrides` follow the study's. Every error names the
study file and line, before anything is trained or evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from nemo_adapt.errors import ConfigError
from nemo_adapt.yaml_lines import read_yaml

SPLITS = ("train", "validation", "test")
RISKS = ("low", "regulated", "high")
PREFER = ("cost", "quality")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# A candidate's directory sits beside these in the study's output directory.
RESERVED = ("logs", "recipes")


@dataclasses.dataclass(frozen=True)
class StudyDataset:
    """The fixed dataset version of a study."""

    version: str
    """A label for the version (recorded beside the hashes)."""
    files: dict[str, str]
    """Split (train, validation, test) -> file path."""
    sha256: dict[str, str]
    """Split -> sha256 of the file's bytes: the version's identity."""

    @property
    def fingerprint(self) -> str:
        """sha256 over the splits' hashes, in split order."""
        return hashlib.sha256("".join(f"{s}:{self.sha256[s]};" for s in SPLITS if s in self.sha256)
                              .encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How every candidate is evaluated (the same way for all)."""

    few_shot: int = 0
    """k of the k-shot prompt-only baseline (the zero-shot one is always scored)."""
    suites: tuple[str, ...] = ()
    """Regression suite files (`eval.suites`)."""
    forgetting: str | None = None
    """Held-out general text for the forgetting measure (`data.general_corpus`); None: not measured."""
    latency_tokens: int = 32
    """Generated tokens per row for the inference cost; 0: not measured."""
    max_examples: int | None = None
    """Test examples per candidate (None: the whole split)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """The cluster the training cost in GPU-hours is estimated for (the planner's step-time model)."""

    gpu: str
    """GPU type (`nemo-adapt plan --gpu` names)."""
    nodes: int = 1
    """Nodes."""
    gpus_per_node: int = 1
    """GPUs per node."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One adaptation strategy of the study."""

    name: str
    """Unique name (its directory under the study's output)."""
    recipe: str
    """Recipe file: what is trained; for a baseline, the model and how the task is asked."""
    line: int
    """Line of the candidate in the study file."""
    baseline: bool = False
    """A prompt-only baseline: nothing is trained (zero-shot and k-shot are scored)."""
    peft: dict | None = None
    """Replaces the recipe's `peft` section when given."""
    overrides: tuple[str, ...] = ()
    """Recipe overrides after the study's."""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A deployment scenario: the gates a candidate must meet, and how to choose among those that do."""

    name: str
    """Scenario name."""
    description: str = ""
    """One line for the report."""
    min_gain: float | None = None
    """Task metric gain over the prompt-only baseline the candidate's 95% lower bound must reach."""
    min_quality: float | None = None
    """Task metric level the candidate's 95% lower bound must reach."""
    max_latency_overhead: float | None = None
    """Decode time per token relative to the base, minus 1, as the candidate would be served."""
    variants: int = 1
    """Adapted variants served side by side (one per customer, domain, ...)."""
    gpu_hours: float | None = None
    """Training budget on the study's target cluster, all variants together."""
    max_forgetting: float | None = None
    """Upper bound of the general-text loss increase (nats/token), judged on its 95% upper bound."""
    suites: tuple[str, ...] = ()
    """Regression suites (by name) that must pass."""
    risk: str = "low"
    """Risk class (low, regulated, high): recorded with the recommendation."""
    prefer: str = "quality"
    """Among candidates that meet every gate: `quality` (the best task metric; a tie within the confidence
    interval goes to the cheaper) or `cost` (the cheapest to train and serve)."""


@dataclasses.dataclass(frozen=True)
class Study:
    """A loaded, validated study file."""

    path: Path
    """The study file."""
    sha256: str
    """sha256 of its bytes."""
    name: str
    """Study name."""
    dataset: StudyDataset
    """The fixed dataset version."""
    candidates: tuple[Candidate, ...]
    """Candidates in file order."""
    evaluation: Evaluation
    """Evaluation settings for every candidate."""
    overrides: tuple[str, ...] = ()
    """Recipe overrides for every trained candidate."""
    max_steps: int | None = None
    """`budget.max_steps`: the same step count for every trained candidate (None: each recipe's own)."""
    target: Target | None = None
    """Cluster for the GPU-hour estimates (None: not estimated)."""
    scenarios: tuple[Scenario, ...] = ()
    """Scenarios to recommend a candidate for."""

    def candidate_overrides(self, c: Candidate) -> list[str]:
        """The overrides a candidate's recipe is loaded with: the study's, its budget, the candidate's own."""
        budget = [f"run.max_steps={self.max_steps}"] if self.max_steps is not None and not c.baseline else []
        return [*self.overrides, *budget, *c.overrides]


def _keys(raw: Any, allowed: set[str], where: str, what: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {what} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - allowed - {"__line__"})
    if unknown:
        raise ConfigError(f"{where}: unknown {what} key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return {k: v for k, v in raw.items() if k != "__line__"}


def _number(value, key: str, where: str, *, low: float | None = None, integer: bool = False, optional: bool = True):
    if value is None and optional:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: {key}={value!r} must be a finite number")
    if low is not None and value < low:
        raise ConfigError(f"{where}: {key}={value!r} must be >= {low}")
    return value


def _strings(value, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
    return tuple(value)


def _path(value, key: str, where: str, base: Path) -> str:
    """A path named in the study: relative to the working directory (as recipes name data) — or, when it does
    not exist there, to the study file's directory."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a file path, got {value!r}")
    if Path(value).exists() or Path(value).is_absolute():
        return value
    beside = base / value
    return str(beside) if beside.exists() else value


def sha256_of(path: str, where: str) -> str:
    """sha256 of a file's bytes.

    Raises:
        ConfigError: the file does not exist (named with `where`).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: {path!r}: no such file")
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (structure only: recipes and data are checked by `check_candidates`).

    Raises:
        ConfigError: not a file, not valid YAML (line named), unknown keys, missing or invalid values, duplicate
            candidate names, no trained candidate, a scenario naming a suite the evaluation does not run — each
            message starts with `FILE:LINE`.
    """
    path = Path(path)
    doc, data = read_yaml(path, "study")
    top = _keys(doc, {"name", "dataset", "overrides", "budget", "evaluation", "target", "candidates", "scenarios"},
                f"{path}:1", "study")
    at = lambda raw: f"{path}:{raw.get('__line__', 1) if isinstance(raw, dict) else 1}"  # noqa: E731
    base = path.parent

    name = top.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}:1: name={name!r} must be ASCII letters, digits, '_' or '-'")

    raw_ds = top.get("dataset")
    if raw_ds is None:
        raise ConfigError(f"{path}:1: `dataset` is required: the train, validation and test files every candidate "
                          "must use")
    ds = _keys(raw_ds, {"version", *SPLITS}, at(raw_ds), "dataset")
    for split in ("train", "test"):
        if split not in ds:
            raise ConfigError(f"{at(raw_ds)}: dataset.{split} is required")
    files = {s: _path(ds[s], f"dataset.{s}", at(raw_ds), base) for s in SPLITS if s in ds}
    dataset = StudyDataset(str(ds.get("version") or name), files,
                           {s: sha256_of(f, f"{at(raw_ds)}: dataset.{s}") for s, f in files.items()})

    overrides = _strings(top.get("overrides"), "overrides", f"{path}:1")
    max_steps = None
    if top.get("budget") is not None:
        budget = _keys(top["budget"], {"max_steps"}, at(top["budget"]), "budget")
        max_steps = _number(budget.get("max_steps"), "budget.max_steps", at(top["budget"]), low=1, integer=True)

    raw_ev = top.get("evaluation") or {}
    ev = _keys(raw_ev, {f.name for f in dataclasses.fields(Evaluation)}, at(raw_ev), "evaluation")
    w = at(raw_ev)
    latency = _number(ev.get("latency_tokens", 32), "evaluation.latency_tokens", w, low=0, integer=True,
                      optional=False)
    if latency == 1:
        raise ConfigError(f"{w}: evaluation.latency_tokens=1: the decode rate needs at least 2 tokens (0: off)")
    evaluation = Evaluation(
        few_shot=_number(ev.get("few_shot", 0), "evaluation.few_shot", w, low=0, integer=True, optional=False),
        suites=tuple(_path(s, "evaluation.suites", w, base) for s in _strings(ev.get("suites"), "evaluation.suites", w)),
        forgetting=_path(ev["forgetting"], "evaluation.forgetting", w, base) if ev.get("forgetting") else None,
        latency_tokens=latency,
        max_examples=_number(ev.get("max_examples"), "evaluation.max_examples", w, low=1, integer=True))

    target = None
    if top.get("target") is not None:
        t = _keys(top["target"], {"gpu", "nodes", "gpus_per_node"}, at(top["target"]), "target")
        if not isinstance(t.get("gpu"), str):
            raise ConfigError(f"{at(top['target'])}: target.gpu must name a GPU type (see `nemo-adapt plan --help`)")
        target = Target(t["gpu"], _number(t.get("nodes", 1), "target.nodes", at(top["target"]), low=1, integer=True,
                                          optional=False),
                        _number(t.get("gpus_per_node", 1), "target.gpus_per_node", at(top["target"]), low=1,
                                integer=True, optional=False))

    raw_cands = top.get("candidates")
    if not isinstance(raw_cands, list) or not raw_cands:
        raise ConfigError(f"{path}:1: `candidates` must be a non-empty list")
    candidates, seen = [], set()
    for raw in raw_cands:
        c = _keys(raw, {"name", "recipe", "baseline", "peft", "overrides"}, at(raw), "candidate")
        w = at(raw)
        cname = c.get("name")
        if not isinstance(cname, str) or not _NAME.match(cname) or cname in RESERVED:
            raise ConfigError(f"{w}: candidate name={cname!r} must be ASCII letters, digits, '_' or '-', and not "
                              f"{' or '.join(RESERVED)} (the study's own directories)")
        if cname in seen:
            raise ConfigError(f"{w}: candidate name {cname!r} is used twice")
        seen.add(cname)
        if "recipe" not in c:
            raise ConfigError(f"{w}: candidate {cname!r} needs `recipe` (for a baseline: the model and how the "
                              "task is asked)")
        recipe = _path(c["recipe"], f"candidate {cname!r} recipe", w, base)
        if not Path(recipe).is_file():
            raise ConfigError(f"{w}: candidate {cname!r}: recipe {recipe!r}: no such file")
        is_baseline = c.get("baseline", False)
        if not isinstance(is_baseline, bool):
            raise ConfigError(f"{w}: candidate {cname!r}: baseline must be true or false, got {is_baseline!r}")
        peft = c.get("peft")
        if peft is not None:
            if is_baseline:
                raise ConfigError(f"{w}: candidate {cname!r} is a prompt-only baseline; it has no `peft`")
            if not isinstance(peft, dict) or not isinstance(peft.get("method"), str):
                raise ConfigError(f"{w}: candidate {cname!r}: peft must be a mapping with `method`, got {peft!r}")
            peft = {k: v for k, v in peft.items() if k != "__line__"}
        own = _strings(c.get("overrides"), f"candidate {cname!r} overrides", w)
        if max_steps is not None and any(o.split("=", 1)[0].strip() == "run.max_steps" for o in own):
            raise ConfigError(f"{w}: candidate {cname!r} sets run.max_steps, but the study's budget.max_steps="
                              f"{max_steps} is the same for every trained candidate; drop one of them")
        candidates.append(Candidate(cname, recipe, raw.get("__line__", 1), is_baseline, peft, own))
    if all(c.baseline for c in candidates):
        raise ConfigError(f"{path}:1: every candidate is a baseline; a study compares at least one trained candidate")
    if sum(c.baseline for c in candidates) > 1:
        raise ConfigError(f"{path}:1: more than one baseline candidate; the one baseline scores both zero-shot "
                          "and k-shot prompting (k = evaluation.few_shot)")

    suite_names: dict[str, str] = {}
    for s in evaluation.suites:
        sname = _suite_name(s)
        if sname in suite_names:
            raise ConfigError(f"{at(raw_ev)}: evaluation.suites: {suite_names[sname]} and {s} are both named "
                              f"{sname!r}; a scenario names suites by name, so give one another `name:`")
        suite_names[sname] = s
    has_baseline = any(c.baseline for c in candidates)
    scenarios, seen_scenarios = [], set()
    for raw in top.get("scenarios") or []:
        s = _keys(raw, {f.name for f in dataclasses.fields(Scenario)}, at(raw), "scenario")
        w = at(raw)
        if not isinstance(s.get("name"), str) or not s["name"]:
            raise ConfigError(f"{w}: a scenario needs a `name`")
        if s["name"] in seen_scenarios:
            raise ConfigError(f"{w}: scenario name {s['name']!r} is used twice")
        seen_scenarios.add(s["name"])
        if s.get("min_gain") is not None and not has_baseline:
            raise ConfigError(f"{w}: scenario {s['name']!r} sets min_gain (over the prompt-only baseline), but no "
                              "candidate is the baseline (`baseline: true`)")
        for key in ("min_quality", "min_gain"):
            v = s.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v and not -1 <= v <= 1:
                raise ConfigError(f"{w}: scenario {s['name']!r}: {key}={v!r}; task metrics lie in [0, 1]")
        risk = s.get("risk", "low")
        if risk not in RISKS:
            raise ConfigError(f"{w}: scenario {s['name']!r}: risk={risk!r}; allowed: {', '.join(RISKS)}")
        prefer = s.get("prefer", "quality")
        if prefer not in PREFER:
            raise ConfigError(f"{w}: scenario {s['name']!r}: prefer={prefer!r}; allowed: {', '.join(PREFER)}")
        needed = _strings(s.get("suites"), "suites", w)
        missing = [n for n in needed if n not in suite_names]
        if missing:
            raise ConfigError(f"{w}: scenario {s['name']!r} requires suite(s) {', '.join(missing)} that "
                              f"evaluation.suites does not run (it runs: {', '.join(sorted(suite_names)) or 'none'})")
        if s.get("max_forgetting") is not None and evaluation.forgetting is None:
            raise ConfigError(f"{w}: scenario {s['name']!r} sets max_forgetting but evaluation.forgetting is not set")
        if s.get("max_latency_overhead") is not None and not evaluation.latency_tokens:
            raise ConfigError(f"{w}: scenario {s['name']!r} sets max_latency_overhead but evaluation.latency_tokens=0")
        if s.get("gpu_hours") is not None and target is None:
            raise ConfigError(f"{w}: scenario {s['name']!r} sets gpu_hours but the study has no `target` cluster")
        scenarios.append(Scenario(
            s["name"], str(s.get("description") or ""),
            _number(s.get("min_gain"), "min_gain", w), _number(s.get("min_quality"), "min_quality", w),
            _number(s.get("max_latency_overhead"), "max_latency_overhead", w, low=0),
            _number(s.get("variants", 1), "variants", w, low=1, integer=True, optional=False),
            _number(s.get("gpu_hours"), "gpu_hours", w, low=0), _number(s.get("max_forgetting"), "max_forgetting", w),
            needed, risk, prefer))
    return Study(path, hashlib.sha256(data).hexdigest(), name, dataset, tuple(candidates), evaluation, overrides,
                 max_steps, target, tuple(scenarios))


def _suite_name(path: str) -> str:
    from nemo_adapt.eval.suites import load_suite

    return load_suite(path).name


def write_candidate_recipe(study: Study, c: Candidate, dest: Path) -> Path:
    """The recipe a candidate trains with: its recipe file, with `peft` replaced when the candidate gives one
    (written to `dest` with a header naming both sources); else the recipe file itself."""
    if c.peft is None:
        return Path(c.recipe)
    from nemo_adapt.config.loader import _header

    source = Path(c.recipe)
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    data["peft"] = dict(c.peft)
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Candidate {c.name!r} of study {study.path} (line {c.line}): {source} with its peft section "
              f"replaced. The recipe's header:\n" + _header(source))
    dest.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dest


def _own_words(err: Exception, written: Path, c: Candidate) -> str:
    """An error about a candidate's written recipe, naming what the user wrote instead: the recipe file and the
    study's `peft:` section (the written file is a temporary merge of the two)."""
    text = str(err)
    if Path(written) != Path(c.recipe):
        text = re.sub(re.escape(str(written)) + r"(:\d+)*:?\s*", "", text)  # its file:line mean nothing to the user
        text = f"{text} (recipe {c.recipe} with the study's peft section {dict(c.peft)})"
    return text


def check_candidates(study: Study, recipe_dir: Path) -> dict[str, Any]:
    """Load every candidate's recipe as `nemo-adapt run` would, and check it uses the study's dataset version.

    Args:
        study: the loaded study.
        recipe_dir: where candidates with a replaced `peft` section get their recipe file written.

    Returns:
        {candidate name: (recipe path, overrides, the resolved `RecipeConfig`)}.

    Raises:
        ConfigError: a recipe that does not load (its own file:line message, prefixed with the candidate's study
            line), or a candidate whose train/validation/test files differ from the study's dataset (by content:
            each split's path and sha256 on both sides named).
    """
    from nemo_adapt.config import load_recipe

    out = {}
    for c in study.candidates:
        where = f"{study.path}:{c.line}: candidate {c.name!r}"
        recipe = write_candidate_recipe(study, c, recipe_dir / c.name / "recipe.yaml")
        overrides = study.candidate_overrides(c)
        try:
            cfg = load_recipe(recipe, overrides)
        except ConfigError as err:
            if study.overrides:  # whose override is wrong: the study's (every candidate) or this candidate's
                try:
                    load_recipe(recipe, [o for o in overrides if o not in study.overrides])
                except ConfigError:
                    pass
                else:
                    raise ConfigError(f"{study.path}: overrides (applied to every candidate; here to {c.name!r}, "
                                      f"recipe {c.recipe}): {_own_words(err, recipe, c)}") from None
            raise ConfigError(f"{where}: {_own_words(err, recipe, c)}") from None
        for split in SPLITS:
            theirs = getattr(cfg.data, split)
            ours = study.dataset.files.get(split)
            if split == "validation" and (ours is None or theirs is None):
                if (ours is None) != (theirs is None) and not c.baseline:
                    raise ConfigError(f"{where}: data.validation is {theirs!r} but the study's dataset "
                                      f"{'has none' if ours is None else 'names ' + repr(ours)}")
                continue
            if split == "train" and c.baseline and theirs is None:
                continue
            if theirs is None:
                raise ConfigError(f"{where}: data.{split} is not set; the study's dataset is {ours!r}")
            digest = sha256_of(theirs, f"{where}: data.{split}")
            if digest != study.dataset.sha256[split]:
                raise ConfigError(
                    f"{where}: data.{split}={theirs!r} (sha256 {digest[:12]}) is not the study's dataset "
                    f"{study.dataset.version!r}: {split} = {ours!r} (sha256 {study.dataset.sha256[split][:12]}); "
                    "every candidate must train and be tested on the same data version")
        if not cfg.data.test:
            raise ConfigError(f"{where}: data.test is not set")
        if c is study.candidates[0]:  # the test split every candidate is scored on must read, before any training
            from nemo_adapt.data.formats import DataError, load_records

            try:
                load_records(cfg.data.test, cfg.data.format, cfg.data.on_bad_record, cfg.data.system_prompt,
                             max_record_bytes=cfg.data.max_record_bytes, warn=False, key="data.test")
            except DataError as err:
                raise ConfigError(f"{where}: {err}") from None
        if c.baseline:
            from nemo_adapt.data.formats import load_records
            from nemo_adapt.eval.runner import baseline_shots

            train = load_records(cfg.data.train, cfg.data.format, "skip", cfg.data.system_prompt,
                                 max_record_bytes=cfg.data.max_record_bytes, warn=False)
            try:
                baseline_shots(train, study.evaluation.few_shot, cfg.run.seed)
            except ConfigError:
                raise ConfigError(f"{study.path}: evaluation.few_shot={study.evaluation.few_shot} asks for more "
                                  f"worked examples than the {len(train)} valid records of {cfg.data.train}") from None
        out[c.name] = (recipe, overrides, cfg)
    return out
