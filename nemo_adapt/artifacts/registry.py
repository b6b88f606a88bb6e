"""The artifact registry: content-addressed, immutable versions of adapters and models, aliases that move only
through gates, and an append-only audit log.

A registry is a location (a local directory by default, `registry/` under the working directory; any fsspec URL
such as `s3://bucket/prefix`), chosen with `--registry` or `NEMO_ADAPT_REGISTRY`:

    objects/sha256/ab/abcdef...      every stored file, named by the sha256 of its bytes (stored once, however
                                     many versions hold it); written whole, never rewritten
    versions/<name>/<id>.json        one manifest per version: kind, files (path -> sha256, size), base model,
                                     dataset, resolved recipe, code versions, evaluation summary, parents, creator
    audit/<seq>.json                 one entry per alias move (promote, rollback) and per refused promotion: who,
                                     when, alias, from, to, the gates file and every gate's value and verdict,
                                     forced, reason; entry N is created only if absent, so the log is append-only
    audit_head.json                  the newest audit entry's number and sha256; each entry also records the
                                     sha256 of the one before it (`prev`), so verify notices an edited, replaced
                                     or deleted entry
    tmp/                             (local) staging for atomic writes; .lock (local) the writers' lock

A version id is the sha256 of its kind and its files' paths and hashes: the same content added twice is the same
version (the second add reports the first), and no byte of a version can change without verify noticing.
Derived metadata (recipe, metrics, lineage) is not part of the id, so a newer nemo-adapt reading the same files
names the same version. An add stores objects first and creates the manifest last, with one create-if-absent:
an add killed at any point leaves either no version or a whole one (at most some unreferenced objects, which
verify reports and which cost nothing but space).

Aliases (`production`, `staging`, any name) are not files of their own: an alias is where the audit log's moves
leave it (a promote pushes a version, a rollback pops back to the one before). So an alias can never disagree
with its history, and two writers cannot both take entry N (see `registry_store` for how each location keeps
writers apart).

The version's tree, as `registry get` writes it back, is a run directory where the artifact was a run (and the
tools that read run directories read it): adapter/ or model/, plus config.yaml, results.json, eval.json, ...
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from nemo_adapt.artifacts.gates import (
    UNFORCEABLE,
    Evidence,
    GateResult,
    check_gates,
    evaluation_problems,
    load_gates,
)
from nemo_adapt.artifacts.registry_store import Store, open_store
from nemo_adapt.errors import ConfigError

FORMAT = "nemo-adapt-registry/1"
"""Manifest format tag."""
ENV = "NEMO_ADAPT_REGISTRY"
"""Environment variable naming the registry location."""
DEFAULT_LOCATION = "registry"
"""The location when neither --registry nor NEMO_ADAPT_REGISTRY is given (relative to the working directory)."""
KINDS = ("run", "adapter", "merged", "hf_model")
"""What can be added: a run directory, an adapter directory, a merged model (merge_config.json), a Hugging Face
model directory (an export)."""
RUN_FILES = ("config.yaml", "results.json", "data_fingerprint.json", "run_summary.json", "metrics.jsonl")
"""A run's files stored beside its adapter/ or model/ (checkpoints, W&B logs, plots and predictions are logs of
the run, not the artifact)."""
EVAL, BASELINE, MATRIX = "eval.json", "eval_baseline.json", "study/matrix.json"
"""Where a version keeps its evaluation, its prompt-only baseline and (added from a study) the study's matrix."""
AUDIT_HEAD = "audit_head.json"
"""The newest audit entry's number and sha256 (the only file the registry ever rewrites): without it, deleting the
newest entry would leave a shorter log that still looks whole."""
RESERVED_ALIASES = ("latest",)
"""`NAME:latest` is the newest version, not an alias that can be moved."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{4,64}$")
_RETRIES = 64


# --------------------------------------------------------------------------------------------------
# Small helpers


def resolve_location(flag: str | None = None) -> str:
    """The registry location: `--registry`, else $NEMO_ADAPT_REGISTRY, else `registry` in the working directory."""
    return flag or os.environ.get(ENV) or DEFAULT_LOCATION


def who() -> str:
    """`user@host` of this process, for manifests and the audit log.

    The user is the process's effective uid as the password database names it, not $USER or $LOGNAME (which
    `getpass.getuser()` reads first, and anyone can set): the audit log says who moved an alias.
    """
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, OSError, AttributeError):  # a container user without a passwd entry; no pwd module
        user = f"uid{os.geteuid()}" if hasattr(os, "geteuid") else getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def version_id(kind: str, files: dict[str, dict]) -> str:
    """The content address of a version: sha256 over its kind and every file's path and sha256.

    Args:
        kind: one of `KINDS`.
        files: version path -> {"sha256", "size"}.

    Returns:
        64 hex digits.
    """
    return hashlib.sha256(_canonical({"kind": kind, "files": {k: v["sha256"] for k, v in files.items()}})).hexdigest()


def manifest_seal(manifest: dict) -> str:
    """sha256 over a manifest's fields except `manifest_sha256` itself (canonical JSON).

    The version id covers the files; the seal covers what the manifest says about them (lineage, recipe, evaluation
    summary), so `verify` notices a manifest edited after it was written. It is tamper-evidence, not a signature:
    whoever can write the registry can recompute it (`verify` also re-derives the evaluation summary from the
    stored eval.json, which the id covers).
    """
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def object_path(sha256: str) -> str:
    """Where the file with this sha256 is stored."""
    return f"objects/sha256/{sha256[:2]}/{sha256}"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r}: expected a JSON object")
    return data


def _refuse_link(path: Path, root: Path) -> None:
    """A symbolic link inside an artifact may point only within it (or, for a Hugging Face hub-cache snapshot,
    into that repository's `blobs/`, where the hub keeps the files): following a link elsewhere would store
    whatever it points at (a host file, a secret) under the artifact's name.

    Raises:
        ConfigError: naming the link and its target.
    """
    if not path.is_symlink():
        return
    target, root = path.resolve(), root.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(a) for a in allowed):
        raise ConfigError(f"{str(path)!r} is a symbolic link to {str(target)!r}, outside {str(root)!r}; the "
                          "registry stores an artifact's own files — copy the file in, or remove the link")


def _walk(root: Path, prefix: str) -> dict[str, Path]:
    """Every regular file under `root` as {prefix/relative path: file}; hidden names (`.tmp-*`, `.git`) skipped.

    Raises:
        ConfigError: a symbolic link among them (`_refuse_link`).
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            _refuse_link(Path(dirpath) / d, root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            _refuse_link(f, root)
            if f.is_file():
                out[f"{prefix}/{f.relative_to(root).as_posix()}"] = f
    return out


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------------------------------
# What is being added


@dataclasses.dataclass
class Scanned:
    """A directory read for adding: what it is and which files make the version."""

    kind: str
    """One of `KINDS`."""
    source: Path
    """The directory given."""
    name: str
    """The default registry name."""
    files: dict[str, Path]
    """Version path -> source file."""
    artifact: dict
    """{"kind": adapter|model, "dir": adapter|model, "format", "method"}."""
    meta: dict = dataclasses.field(default_factory=dict)
    """Manifest fields derived from the files (base_model, dataset, recipe, code_version, merge, parents)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the user should know (no evaluation recorded, no baseline, ...)."""


def _not_an_artifact(path: Path) -> ConfigError:
    if not path.is_dir():
        return ConfigError(f"{str(path)!r} is a file; nemo-adapt registry adds a directory: a run directory, an "
                           "adapter, a merged or Hugging Face model directory, or a strategy study's output")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:12]
    return ConfigError(
        f"{str(path)!r} is not an artifact nemo-adapt registry can add: expected a run directory (config.yaml and "
        "results.json, with adapter/ or model/), an adapter (adapter_config.json + adapter_model.safetensors), a "
        "merged model (merge_config.json + config.json + *.safetensors), a Hugging Face model directory (config.json "
        "+ *.safetensors) or a strategy study's output (matrix.json, with --scenario); found: "
        f"{', '.join(found) or 'nothing'}")


def _scan_adapter_dir(path: Path, prefix: str) -> tuple[dict[str, Path], dict, dict]:
    """(files, artifact description, adapter_config.json) of an adapter directory, opened by `open_adapter`."""
    from nemo_adapt.artifacts.adapter import open_adapter

    files = open_adapter(path)  # refuses what is not an adapter (no weights, a pickle, unknown method) clearly
    _check_safetensors(files.path / "adapter_model.safetensors")  # open_adapter reads JSON only
    return _walk(path, prefix), {"kind": "adapter", "dir": prefix, "format": files.format, "method": files.method}, \
        files.description


def _check_safetensors(w: Path) -> None:
    """Refuse a weights file whose safetensors header cannot be read (junk, truncated, another format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(w), framework="numpy") as f:  # reads the header only
            f.keys()
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ConfigError(f"{str(w)!r} is not a readable safetensors file: {err}") from None


def _scan_model_dir(path: Path, prefix: str) -> tuple[dict[str, Path], dict]:
    """(files, artifact description) of a Hugging Face model directory (config.json + readable safetensors)."""
    weights = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not weights:
        raise ConfigError(f"{str(path)!r} is not a Hugging Face model directory: it needs config.json and "
                          f"*.safetensors weights (found {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})")
    for w in weights:
        _check_safetensors(w)
    config = _read_json(path / "config.json", "model config")
    return _walk(path, prefix), {"kind": "model", "dir": prefix, "format": "hf",
                                 "architecture": (config.get("architectures") or [None])[0]}


def _dataset_meta(run: Path, results: dict) -> dict:
    fp = {}
    if (run / "data_fingerprint.json").is_file():
        fp = (_read_json(run / "data_fingerprint.json", "data fingerprint").get("fingerprint") or {})
    combined = fp.get("combined") or (results.get("data") or {}).get("fingerprint")
    return {"fingerprint": combined, "version": combined[:12] if combined else None,
            "splits": {k: v for k, v in fp.items() if k != "combined"}}


def _scan_run(path: Path) -> Scanned:
    try:
        recipe = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path / 'config.yaml'}{where}: not valid YAML ({what})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path / 'config.yaml'}: not a resolved recipe (expected a mapping)")
    if not (path / "results.json").is_file():
        raise ConfigError(f"{str(path)!r} is a run that has not finished (no results.json): register it once "
                          "`nemo-adapt run` has written its adapter/ or model/")
    results = _read_json(path / "results.json", "run results")
    method = ((recipe.get("peft") or {}).get("method")) or "none"
    if method == "none":
        if not (path / "model").is_dir():
            raise ConfigError(f"{str(path)!r} is a full fine-tuning run without model/ (written when training "
                              "completes)")
        files, artifact = _scan_model_dir(path / "model", "model")
        artifact["method"] = "full"
    else:
        if not (path / "adapter").is_dir():
            raise ConfigError(f"{str(path)!r} is a {method} run without adapter/ (written when training completes)")
        files, artifact, _ = _scan_adapter_dir(path / "adapter", "adapter")
    for name in RUN_FILES:
        _refuse_link(path / name, path)
        if (path / name).is_file():
            files[name] = path / name
    model = recipe.get("model") or {}
    run = recipe.get("run") or {}
    peft = recipe.get("peft") or {}
    parents = []
    if peft.get("init_from"):
        parents.append(_file_parent("init_from", Path(peft["init_from"]) / "adapter_model.safetensors",
                                    str(peft["init_from"])))
    meta = {"base_model": {"fingerprint": results.get("base_model_fingerprint"), "name": model.get("name"),
                           "checkpoint": model.get("checkpoint")},
            "dataset": _dataset_meta(path, results), "recipe": recipe, "parents": parents,
            "training": {k: results.get(k) for k in ("step", "tokens_seen", "trainable_params", "base_params",
                                                      "exit_code", "layout")}}
    return Scanned("run", path, str(run.get("name") or path.name), files, artifact, meta)


def _file_parent(relation: str, weights: Path, where: str) -> dict:
    """A parent named by a path: its weights' sha256 when the file is there (so a registered version can be found)."""
    from nemo_adapt.data.fingerprint import sha256_file

    return {"relation": relation, "path": where, "sha256": sha256_file(weights) if weights.is_file() else None}


def _scan_merged(path: Path) -> Scanned:
    cfg = _read_json(path / "merge_config.json", "merge config")
    files, artifact = _scan_model_dir(path, "model")
    artifact["method"] = f"merged:{cfg.get('merge_method')}"
    parents = [{"relation": "merge_parent", "path": m.get("model"), "sha256": m.get("sha256"),
                "fingerprint": m.get("fingerprint"), "weight": m.get("weight")} for m in cfg.get("models") or []]
    base = cfg.get("base_model") or {}
    if not base.get("fingerprint"):
        # Adapters merged into their base: the merge checked they share one; each parent records it.
        bases = {(m.get("base_model_fingerprint"), m.get("base_model")) for m in cfg.get("models") or []
                 if m.get("base_model_fingerprint")}
        if len({fp for fp, _ in bases}) == 1:
            fp, where = sorted(bases, key=str)[0]
            base = {"fingerprint": fp, "model": where}
    meta = {"base_model": {"fingerprint": base.get("fingerprint"), "name": cfg.get("architecture"),
                           "checkpoint": base.get("model")},
            "merge": {"status": cfg.get("status"), "method": cfg.get("merge_method"),
                      "parameters": cfg.get("parameters"), "validation": cfg.get("validation")},
            "parents": parents, "code_version": {"merged": cfg.get("code_version")}}
    name = path.name
    return Scanned("merged", path, name, files, artifact, meta)


def scan_artifact(path: str | os.PathLike, *, eval_file: str | None = None, baseline_file: str | None = None,
                  scenario: str | None = None) -> Scanned:
    """Read a directory to be added: what kind it is, its files, and what its files say about it.

    Args:
        path: a run directory, an adapter directory, a merged model, a Hugging Face model directory, or a strategy
            study's output directory (with `scenario`: the candidate the study recommends for it).
        eval_file: the evaluation to record (`nemo-adapt eval` output); default: a run's eval.json. `none`: record
            no evaluation.
        baseline_file: the prompt-only baseline to record (eval_baseline.json); default: a run's own, or a study's
            baseline candidate's.
        scenario: for a study directory, the scenario whose recommendation is added.

    Returns:
        The scanned artifact (files not hashed yet).

    Raises:
        ConfigError: no such directory; a directory that is none of these (with what it holds); an unfinished run;
            an unreadable file; an evaluation of other weights than these; a study without `scenario`, or a
            scenario it does not have or recommends nothing for.
        CheckpointError: an adapter directory `open_adapter` refuses.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{str(p)!r}: no such directory")
    if not p.is_dir():
        raise _not_an_artifact(p)
    study = None
    if (p / "matrix.json").is_file():
        study, p = _study_candidate(p, scenario)
    elif scenario is not None:
        raise ConfigError(f"--scenario {scenario!r}: {str(p)!r} is not a strategy study's output (no matrix.json)")
    inner = _got_artifact_dir(p)
    outer, p = (p, inner) if inner is not None else (None, p)
    if (p / "config.yaml").is_file() and ((p / "adapter").is_dir() or (p / "model").is_dir()
                                          or (p / "results.json").is_file()):
        scanned = _scan_run(p)
    elif (p / "merge_config.json").is_file():
        scanned = _scan_merged(p)
    elif (p / "adapter_config.json").is_file():
        files, artifact, desc = _scan_adapter_dir(p, "adapter")
        init_from = (desc.get("peft") or {}).get("init_from")
        scanned = Scanned("adapter", p, str(desc.get("run") or (p.parent.name if p.name == "adapter" else p.name)),
                          files, artifact,
                          {"base_model": {"fingerprint": desc.get("base_model_fingerprint") or
                                          (desc.get("nemo_adapt") or {}).get("base_model_fingerprint"),
                                          "name": desc.get("base_model"),
                                          "checkpoint": desc.get("base_checkpoint") or desc.get("base_model_name_or_path")},
                           "dataset": {"fingerprint": desc.get("data_fingerprint"),
                                       "version": (desc.get("data_fingerprint") or "")[:12] or None}})
        scanned.meta["parents"] = [_file_parent("init_from", Path(init_from) / "adapter_model.safetensors", init_from)] \
            if init_from else []
    elif (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        files, artifact = _scan_model_dir(p, "model")
        # A run's model/ (full fine-tuning) is named after its run, not "model".
        scanned = Scanned("hf_model", p, p.parent.name if p.name == "model" else p.name, files, artifact, {})
    else:
        raise _not_an_artifact(outer or p)
    if outer is not None:  # a tree `registry get` wrote: its evaluation and study beside the artifact, as stored
        scanned.source, scanned.name = outer, outer.name
        eval_file = eval_file if eval_file is not None or not (outer / EVAL).is_file() else str(outer / EVAL)
        if baseline_file is None and (outer / BASELINE).is_file():
            baseline_file = str(outer / BASELINE)
    got = outer if outer is not None else p
    if study is None and (got / MATRIX).is_file():
        scanned.files[MATRIX] = got / MATRIX
    if study is not None:
        matrix_path, baseline_dir, link = study
        scanned.files[MATRIX] = matrix_path
        scanned.meta.setdefault("parents", []).append(link)
        if baseline_file is None and baseline_dir is not None and (baseline_dir / BASELINE).is_file():
            baseline_file = str(baseline_dir / BASELINE)
    _attach_evaluation(scanned, eval_file, baseline_file)
    return scanned


def _got_artifact_dir(p: Path) -> Path | None:
    """For a tree `registry get` wrote of an adapter, merged or Hugging Face model version (adapter/ or model/,
    beside at most eval.json, eval_baseline.json and study/): that adapter/ or model/ directory. Else None."""
    if (p / "config.yaml").exists():
        return None  # a run directory
    inner = [d for d in ("adapter", "model") if (p / d).is_dir()]
    rest = {e.name for e in p.iterdir()} - set(inner)
    if len(inner) != 1 or not rest <= {EVAL, BASELINE, MATRIX.split("/")[0]}:
        return None
    return p / inner[0]


def _study_candidate(out: Path, scenario: str | None) -> tuple[tuple[Path, Path | None, dict], Path]:
    """((matrix.json, the baseline candidate's directory, the lineage link), the recommended candidate's run dir)."""
    matrix = _read_json(out / "matrix.json", "study matrix")
    judged = {s["scenario"]["name"]: s for s in matrix.get("scenarios") or []}
    listing = ", ".join(f"{n} (recommends {s.get('recommendation') or 'none'})" for n, s in judged.items()) or "none"
    if scenario is None:
        raise ConfigError(f"{str(out)!r} is a strategy study's output: say which scenario's recommendation to add "
                          f"with --scenario; its scenarios: {listing}")
    if scenario not in judged:
        raise ConfigError(f"study {matrix.get('study')!r} has no scenario {scenario!r}{_suggest(scenario, list(judged))}"
                          f" (its scenarios: {listing})")
    pick = judged[scenario].get("recommendation")
    if not pick:
        raise ConfigError(f"study {matrix.get('study')!r} recommends no candidate for {scenario!r}: "
                          f"{judged[scenario].get('why')}")
    rows = {r["name"]: r for r in matrix.get("rows") or []}
    if rows.get(pick, {}).get("kind") == "baseline":
        raise ConfigError(f"study {matrix.get('study')!r} recommends the prompt-only baseline {pick!r} for "
                          f"{scenario!r}: there is no trained artifact to register")
    if not (out / pick).is_dir():
        raise ConfigError(f"study {matrix.get('study')!r} recommends {pick!r} for {scenario!r}, but {str(out / pick)!r} "
                          "does not exist (was the study's output moved or pruned?)")
    base_row = next((r for r in rows.values() if r.get("kind") == "baseline"), None)
    link = {"relation": "study", "study": matrix.get("study"), "study_sha256": matrix.get("study_sha256"),
            "scenario": scenario, "recommendation": pick, "why": judged[scenario].get("why"),
            "dataset_version": (matrix.get("dataset") or {}).get("version")}
    return (out / "matrix.json", out / base_row["name"] if base_row else None, link), out / pick


def _attach_evaluation(s: Scanned, eval_file: str | None, baseline_file: str | None) -> None:
    """Add the evaluation (and baseline) to the version, after checking it evaluated these very weights."""
    from nemo_adapt.data.fingerprint import sha256_file

    if eval_file == "none":
        source = None
    elif eval_file is not None:
        source = Path(eval_file)
        if not source.is_file():
            raise ConfigError(f"--eval {eval_file!r}: no such file")
    else:
        source = s.source / EVAL if s.kind == "run" and (s.source / EVAL).is_file() else None
    if source is None:
        how = ("nemo-adapt eval RUN --model DIR --suite ..., then add with --eval RUN/eval_model_*.json"
               if s.artifact["kind"] == "model" and s.kind != "run" else "nemo-adapt eval RUN, then add again, or --eval FILE")
        s.notes.append(f"no evaluation recorded: every metric gate will fail ({how})")
        if s.kind == "merged":
            s.notes.append("a merged model is promoted only with a regression-suite pass and merge status validated")
        s.meta["evaluation"] = None
    else:
        result = _read_json(source, "evaluation")
        prov = result.get("provenance")
        if not isinstance(result.get("metrics"), dict) or not isinstance(prov, dict):
            raise ConfigError(f"{str(source)!r} is not a `nemo-adapt eval` result with metrics and provenance "
                              "(written by an older version?): evaluate again, or add with --eval none")
        art = s.artifact
        if art["kind"] == "adapter":
            weights = s.files.get(f"{art['dir']}/adapter_model.safetensors")
            evaluated = (prov.get("adapter") or {}).get("weights_sha256")
            have = sha256_file(weights) if weights else None
            if evaluated != have:
                raise ConfigError(f"{str(source)!r} evaluated {'no adapter' if evaluated is None else 'adapter weights sha256 ' + evaluated[:12]}, "
                                  f"but this adapter's weights are sha256 {str(have)[:12]}: evaluate this adapter "
                                  "(nemo-adapt eval RUN) and add again")
        else:
            _check_model_evaluated(s, source, prov)
        inconsistent = evaluation_problems(result)
        if inconsistent:
            raise ConfigError(f"{str(source)!r} contradicts itself: {'; '.join(inconsistent)} (edited by hand? "
                              "evaluate again with nemo-adapt eval)")
        s.files[EVAL] = source
        s.meta["evaluation"] = evaluation_summary(result)
        s.meta.setdefault("code_version", {})["evaluated"] = prov.get("code_version")
        s.meta.setdefault("dataset", {})["test_sha256"] = prov.get("test_sha256")
    if baseline_file is None and s.kind == "run" and (s.source / BASELINE).is_file():
        baseline_file = str(s.source / BASELINE)
    if baseline_file == "none":
        baseline_file = None
    elif baseline_file is not None:
        _check_baseline(s, Path(baseline_file), source)
        s.files[BASELINE] = Path(baseline_file)
    elif source is not None:
        s.notes.append("no prompt-only baseline recorded: a min_over_baseline gate will fail (nemo-adapt eval RUN "
                       "--baseline, or --baseline FILE)")


def _check_baseline(s: Scanned, path: Path, evaluation: Path | None) -> None:
    """A prompt-only baseline is the base model, prompted, on the same test split: every entry self-consistent,
    no adapter applied, the version's base model (by fingerprint) and the evaluation's test file (by sha256)."""
    b = _read_json(path, "baseline")
    if not isinstance(b.get("baseline"), dict) or "metrics" not in b["baseline"]:
        raise ConfigError(f"{str(path)!r} is not a `nemo-adapt eval RUN --baseline` result (no baseline.metrics)")
    base_fp = (s.meta.get("base_model") or {}).get("fingerprint")
    test_sha = (s.meta.get("evaluation") or {}).get("test_sha256")
    for key, entry in b.items():
        if not isinstance(entry, dict):
            continue
        prov = entry.get("provenance") or {}
        wrong = [f"{key}: {p}" for p in evaluation_problems(entry)]
        if prov.get("adapter"):
            wrong.append(f"{key}: an adapter was applied (a prompt-only baseline is the base model alone)")
        model_fp = (prov.get("model") or {}).get("fingerprint")
        if base_fp and model_fp and model_fp != base_fp:
            wrong.append(f"{key}: evaluated model {model_fp}, but this version's base model is {base_fp}")
        if test_sha and prov.get("test_sha256") and prov["test_sha256"] != test_sha:
            wrong.append(f"{key}: scored on test sha256 {prov['test_sha256'][:12]}, the evaluation on {test_sha[:12]}"
                         f" ({evaluation})")
        if wrong:
            raise ConfigError(f"baseline {str(path)!r} cannot be compared with this version: {'; '.join(wrong)}")


def _check_model_evaluated(s: Scanned, source: Path, prov: dict) -> None:
    """An evaluation of a model directory must be of these weights: its recorded fingerprint is recomputed here."""
    from types import SimpleNamespace

    from nemo_adapt.models.loader import base_fingerprint

    if prov.get("adapter"):
        raise ConfigError(f"{str(source)!r} evaluated an adapter on its base, not this model")
    recorded = (prov.get("model") or {}).get("fingerprint")
    arch = (prov.get("model") or {}).get("architecture")
    model_dir = s.files[f"{s.artifact['dir']}/config.json"].parent
    staged = tempfile.mkdtemp(prefix="nemo-adapt-fp-")
    try:  # base_fingerprint hashes a directory's *.safetensors: point it at exactly the stored ones
        for k, f in s.files.items():
            if k.startswith(f"{s.artifact['dir']}/") and k.endswith(".safetensors") and k.count("/") == 1:
                os.symlink(f.resolve(), Path(staged) / f.name)
        have = base_fingerprint(SimpleNamespace(spec=SimpleNamespace(name=arch), location=staged))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if recorded != have:
        raise ConfigError(f"{str(source)!r} evaluated model {recorded}, but {str(model_dir)!r} is {have}: evaluate "
                          f"this model (nemo-adapt eval RUN --model {model_dir}) and add again")


def evaluation_summary(result: dict) -> dict:
    """The manifest's `evaluation` field: what `list`/`show`/`diff` print, derived from eval.json alone (so
    `verify` can derive it again from the stored file and compare)."""
    prov = result.get("provenance") or {}
    return {
        "metric": prov.get("metric"), "n": result.get("n"), "test_file": prov.get("test_file"),
        "test_sha256": prov.get("test_sha256"), "metrics": _metric_summary(result.get("metrics")),
        "suites": {k: {f: v.get(f) for f in ("pass", "passed", "checked", "sha256")}
                   for k, v in (result.get("suites") or {}).items() if isinstance(v, dict)},
        "forgetting": (result.get("forgetting") or {}).get("loss_delta"),
        "inference_cost": sorted(result.get("inference_cost") or {}),
        "code_version": prov.get("code_version")}


def _metric_summary(metrics: dict | None) -> dict:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, dict) and "value" in v:
            out[k] = {f: v[f] for f in ("value", "low", "high", "n") if f in v}
        elif isinstance(v, dict) and k in ("field_accuracy", "label_accuracy"):
            out[k] = {f: {g: e[g] for g in ("value", "low", "high") if g in e} for f, e in v.items()
                      if isinstance(e, dict)}
    return out


# --------------------------------------------------------------------------------------------------
# Versions and the registry


@dataclasses.dataclass(frozen=True)
class Version:
    """A registered version: its name, content id and manifest."""

    name: str
    """Registry name."""
    id: str
    """Content address (64 hex digits)."""
    manifest: dict
    """The manifest as stored."""

    @property
    def short(self) -> str:
        """The id's first 12 hex digits, as printed."""
        return self.id[:12]

    @property
    def ref(self) -> str:
        """`name:short id`."""
        return f"{self.name}:{self.short}"


@dataclasses.dataclass
class AddResult:
    """What `Registry.add` did."""

    version: Version
    """The version (new, or the one with the same content)."""
    created: bool
    """False: the same content was registered already (nothing was written)."""
    new_objects: int
    """Files stored now (the rest were stored by earlier versions)."""
    notes: list[str]
    """Hints for the user."""


@dataclasses.dataclass
class PromoteResult:
    """What `Registry.promote` decided."""

    version: Version
    """The version promoted (or refused)."""
    alias: str
    """The alias."""
    previous: str | None
    """The version id the alias pointed to before."""
    gates: list[GateResult]
    """Every gate's outcome."""
    moved: bool
    """Whether the alias now points to the version."""
    forced: bool
    """Moved although gates failed (--force)."""
    entry: dict | None
    """The audit entry written (None when nothing was: the alias already pointed there)."""

    @property
    def failed(self) -> list[GateResult]:
        """The gates that failed."""
        return [g for g in self.gates if not g.passed]


@dataclasses.dataclass
class VerifyReport:
    """What `Registry.verify` found."""

    versions: int
    """Versions checked."""
    files: int
    """Stored files re-hashed."""
    problems: list[str]
    """Each damaged or missing file, bad manifest or broken audit entry (empty: the registry is consistent)."""
    notes: list[str]
    """Harmless findings: unreferenced objects and temporary files left by interrupted writes."""


class Registry:
    """A registry at one location (see the module docstring for the layout)."""

    def __init__(self, location: str | None = None):
        """Open (lazily: nothing is created before the first write) the registry at `location`.

        Args:
            location: a path or fsspec URL; default `resolve_location()`.

        Raises:
            ConfigError: a URL whose filesystem package is not installed.
        """
        self.location = resolve_location(location)
        self.store: Store = open_store(self.location)
        root = getattr(self.store, "root", None)
        if isinstance(root, Path) and root.exists() and not root.is_dir():
            raise ConfigError(f"registry {self.store.url} is a file, not a directory: name a directory "
                              f"(--registry or ${ENV})")
        # Manifests and audit entries never change once written: each is read once per Registry (on an object
        # store every read is a request). Listings are not cached: other writers add to them.
        self._manifests: dict[tuple[str, str], Version] = {}
        self._entries: dict[str, dict] = {}
        self._entry_sha: dict[str, str] = {}  # audit file name -> sha256 of its bytes (what the next entry chains to)

    # ---- reading

    def check_exists(self, writing: bool = False) -> None:
        """Refuse a location that is not a registry, so a typo is neither read as an empty registry nor turned
        into one (`add` would scatter objects/ and versions/ into an unrelated directory).

        An empty (or, on an object store, absent) location is an empty registry; for writing, a missing local
        directory is created by the first write.

        Raises:
            ConfigError: (reading) a local location that does not exist; one that holds other files and none of a
                registry's own (versions/, objects/, audit/).
        """
        root = getattr(self.store, "root", None)
        if not writing and isinstance(root, Path) and not root.exists():
            raise ConfigError(f"no registry at {self.store.url}: it does not exist (registries are made by "
                              f"`nemo-adapt registry add`; name one with --registry or ${ENV})")
        entries = set(self.store.listdir("")) - {"tmp", ".lock"}
        if entries and not entries & {"versions", "objects", "audit", AUDIT_HEAD}:
            shown = ", ".join(sorted(entries)[:8])
            raise ConfigError(f"no registry at {self.store.url}: it holds {shown}{', ...' if len(entries) > 8 else ''} "
                              f"but no versions/, objects/ or audit/ (name the registry with --registry or ${ENV}"
                              f"{'; `add` starts a new one in an empty or new directory' if writing else ''})")

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return [n for n in self.store.listdir("versions") if _NAME.match(n)]

    def versions(self, name: str) -> list[Version]:
        """A name's versions, oldest first."""
        out = []
        for entry in self.store.listdir(f"versions/{name}"):
            if entry.endswith(".json") and re.fullmatch(r"[0-9a-f]{64}", entry[:-5]):
                out.append(self._load(name, entry[:-5]))
        return sorted(out, key=lambda v: (v.manifest.get("created", {}).get("at", ""), v.id))

    def _load(self, name: str, vid: str) -> Version:
        if (name, vid) in self._manifests:
            return self._manifests[(name, vid)]
        rel = f"versions/{name}/{vid}.json"
        try:
            manifest = json.loads(self.store.read(rel))
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"{self.store.url}/{rel}: unreadable manifest ({err}); run `nemo-adapt registry "
                              "verify`") from None
        version = self._manifests[(name, vid)] = Version(name, vid, manifest)
        return version

    def _audit_files(self) -> list[tuple[str, dict | str]]:
        """(file name, entry) for every audit file in order; the entry is an error message when it is unreadable."""
        out: list[tuple[str, dict | str]] = []
        for entry in self.store.listdir("audit"):
            if re.fullmatch(r"\d{8}\.json", entry):
                if entry not in self._entries:
                    raw = self.store.read(f"audit/{entry}")
                    self._entry_sha[entry] = hashlib.sha256(raw).hexdigest()
                    try:
                        data = json.loads(raw)
                    except (ValueError, UnicodeDecodeError) as err:
                        out.append((entry, f"unreadable JSON ({err})"))
                        continue
                    if not isinstance(data, dict) or not isinstance(data.get("seq"), int) or \
                            not {"name", "alias", "action"} <= set(data):
                        out.append((entry, "not an audit entry (expected a JSON object with seq, name, alias, action)"))
                        continue
                    self._entries[entry] = data
                out.append((entry, self._entries[entry]))
        return out

    def audit(self) -> list[dict]:
        """Every audit entry, in order.

        Raises:
            ConfigError: an audit entry is damaged (named; `nemo-adapt registry verify` lists every problem).
        """
        return self._entries_of(self._audit_files())

    def _entries_of(self, files: list[tuple[str, dict | str]]) -> list[dict]:
        out = []
        for entry, e in files:
            if isinstance(e, str):
                raise ConfigError(f"{self.store.url}/audit/{entry}: {e}; the audit log is damaged (run `nemo-adapt "
                                  "registry verify`)")
            out.append(e)
        return sorted(out, key=lambda e: e["seq"])

    @staticmethod
    def _stacks(entries: list[dict]) -> dict[tuple[str, str], list[str]]:
        """(name, alias) -> the versions it was moved to, oldest first, with rolled-back moves popped."""
        stacks: dict[tuple[str, str], list[str]] = {}
        for e in entries:
            stack = stacks.setdefault((e["name"], e["alias"]), [])
            if e["action"] == "promote":
                stack.append(e["to"])
            elif e["action"] == "rollback" and stack:
                stack.pop()
        return stacks

    def aliases(self, entries: list[dict] | None = None) -> dict[str, dict[str, str]]:
        """{name: {alias: version id}} as the audit log leaves them."""
        out: dict[str, dict[str, str]] = {}
        for (name, alias), stack in self._stacks(self.audit() if entries is None else entries).items():
            if stack:
                out.setdefault(name, {})[alias] = stack[-1]
        return out

    def resolve(self, ref: str) -> Version:
        """The version a reference names.

        Args:
            ref: `NAME` or `NAME:latest` (the newest version), `NAME:ALIAS`, or `NAME:ID` (a unique prefix of at
                least 4 hex digits).

        Raises:
            ConfigError: an unknown name, alias or version (the closest existing one suggested), or an ambiguous
                prefix.
        """
        name, sep, what = ref.partition(":")
        if re.fullmatch(r"[0-9a-fA-F]{4,64}", what) and not _HEX.match(what):
            what = what.lower()  # ids are printed in lower case; a prefix copied in upper case means the same id
        names = self.names()
        if name not in names:
            listing = ", ".join(names[:20]) or "none yet"
            raise ConfigError(f"no artifact named {name!r} in registry {self.store.url}{_suggest(name, names)} "
                              f"(names: {listing})")
        versions = self.versions(name)
        if not versions:
            raise ConfigError(f"{name!r} has no versions in registry {self.store.url}")
        if not sep or what == "latest":
            return versions[-1]
        if _HEX.match(what):  # an alias is never all hex digits (`_check_alias`): no need to read the log first
            hits = [v for v in versions if v.id.startswith(what)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ConfigError(f"{ref!r} is ambiguous: {', '.join(v.short for v in hits)}; give more digits")
        aliases = self.aliases().get(name, {})
        if what in aliases:
            return next(v for v in versions if v.id == aliases[what])
        # Only what would resolve is suggested: aliases that point somewhere now (not ones a refused promotion or a
        # rollback left unset) and versions that exist.
        choices = [*aliases, *(v.short for v in versions), "latest"]
        raise ConfigError(f"{name!r} has no version or alias {what!r}{_suggest(what, choices)} (aliases: "
                          f"{', '.join(f'{a} -> {i[:12]}' for a, i in aliases.items()) or 'none'}; versions: "
                          f"{', '.join(v.short for v in versions[-10:])})")

    def read_object(self, version: Version, rel: str) -> bytes:
        """A stored file of a version, checked against its sha256.

        Raises:
            ConfigError: the version has no such file, or the stored bytes do not match (damaged: run verify).
        """
        entry = version.manifest["files"].get(rel)
        if entry is None:
            raise ConfigError(f"{version.ref} has no file {rel!r}")
        data = self.store.read(object_path(entry["sha256"]))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ConfigError(f"{version.ref}: stored {rel} does not match its sha256 (the registry is damaged); "
                              "run `nemo-adapt registry verify`")
        return data

    def evidence(self, version: Version) -> Evidence:
        """What the gates read: the version's stored evaluation and baseline, artifact size and merge status."""
        files = version.manifest["files"]
        result = json.loads(self.read_object(version, EVAL)) if EVAL in files else None
        baseline = json.loads(self.read_object(version, BASELINE)).get("baseline") if BASELINE in files else None
        art = version.manifest.get("artifact") or {}
        size = sum(f["size"] for k, f in files.items() if k.startswith(f"{art.get('dir')}/"))
        status = _merge_status(version.manifest) if version.manifest["kind"] == "merged" else None
        return Evidence(result, baseline, size, status)

    # ---- writing

    def add(self, path: str | os.PathLike, *, name: str | None = None, eval_file: str | None = None,
            baseline_file: str | None = None, scenario: str | None = None,
            log_wandb: Callable[[dict, Scanned], dict | None] | None = None) -> AddResult:
        """Register a directory as a version (or find the version with the same content).

        Args:
            path: what to add (see `scan_artifact`).
            name: the registry name (default: the run's name, else the directory's).
            eval_file, baseline_file, scenario: see `scan_artifact`.
            log_wandb: called with (manifest, scanned) before the manifest is written, returning the W&B link to
                record (default: `wandb_link`, which does nothing unless W&B is online).

        Returns:
            The version, whether it is new, how many files were stored now.

        Raises:
            ConfigError: see `scan_artifact`; a bad name.
        """
        from nemo_adapt.data.fingerprint import sha256_file
        from nemo_adapt.logging.scrub import scrub
        from nemo_adapt.provenance import code_version

        scanned = scan_artifact(path, eval_file=eval_file, baseline_file=baseline_file, scenario=scenario)
        name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", scanned.name).lstrip("._-") or "artifact"
        if not _NAME.match(name):
            raise ConfigError(f"name {name!r}: use letters, digits, '_', '-' or '.' (at most 128, starting with a "
                              "letter or digit)")
        files = {rel: {"sha256": sha256_file(src), "size": src.stat().st_size} for rel, src in sorted(scanned.files.items())}
        vid = version_id(scanned.kind, files)
        rel = f"versions/{name}/{vid}.json"
        if self.store.exists(rel):
            return AddResult(self._load(name, vid), False, 0, scanned.notes)
        new = 0
        for path_in_version, src in scanned.files.items():
            sha = files[path_in_version]["sha256"]
            new += self.store.put_object(src, object_path(sha), sha)
        art = dict(scanned.artifact, bytes=sum(f["size"] for k, f in files.items() if k.startswith(f"{scanned.artifact['dir']}/")))
        manifest = {
            "format": FORMAT, "id": vid, "name": name, "kind": scanned.kind, "artifact": art, "files": files,
            **{k: scrub(v) for k, v in scanned.meta.items()},  # a recipe or lineage field never carries a secret here
            "created": {"by": who(), "at": _now(), "from": str(Path(scanned.source).resolve()),
                        "registered_with": code_version()},
        }
        manifest.setdefault("parents", [])
        manifest["wandb"] = (log_wandb or wandb_link)(manifest, scanned)
        manifest = json.loads(json.dumps(manifest, default=str))  # sealed as it will be read back
        manifest["manifest_sha256"] = manifest_seal(manifest)
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        with self.store.lock():
            created = self.store.create(rel, data)
        if created:  # as stored (a JSON round trip), without reading it back
            self._manifests[(name, vid)] = Version(name, vid, json.loads(data))
        return AddResult(self._load(name, vid), created, new, scanned.notes)

    def _append(self, make: Callable[[list[dict]], dict | None]) -> dict | None:
        """Append one audit entry built from the log as it stands (retried if another writer took the number).

        Each entry carries `prev`, the sha256 of the entry before it, so an edited or replaced entry breaks the
        chain; `AUDIT_HEAD` names the newest entry and its sha256, so a deleted or edited newest entry shows too.
        """
        for _ in range(_RETRIES):
            with self.store.lock():
                files = self._audit_files()  # one listing serves the check and the entries
                damaged = self._log_problems(files)
                if damaged:  # appending would bury the damage under a valid-looking entry
                    raise ConfigError(f"registry {self.store.url}: the audit log is damaged ({'; '.join(damaged)}); "
                                      "nothing was written. Restore the log from a backup (`nemo-adapt registry "
                                      "verify` lists every problem)")
                entries = self._entries_of(files)
                entry = make(entries)
                if entry is None:
                    return None
                seq = (entries[-1]["seq"] + 1) if entries else 1
                prev = self._entry_sha.get(f"{seq - 1:08d}.json") if entries else None
                entry = {"seq": seq, **entry, "prev": prev}
                data = (json.dumps(entry, indent=2, default=str) + "\n").encode()
                if self.store.create(f"audit/{seq:08d}.json", data):
                    self._advance_head(seq, hashlib.sha256(data).hexdigest())
                    return entry
        raise ConfigError(f"registry {self.store.url}: could not append to the audit log after {_RETRIES} tries "
                          "(other writers kept taking the next entry); try again")

    def _head(self) -> dict | None:
        try:
            head = json.loads(self.store.read(AUDIT_HEAD))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"damaged": True}
        return head if isinstance(head, dict) else {"damaged": True}

    def _advance_head(self, seq: int, sha: str) -> None:
        """Point the head at entry `seq` unless it already names a later one (a writer that lost a race on an
        object store, which has no lock, must not move it back)."""
        head = self._head()
        if head is None or not isinstance(head.get("seq"), int) or head["seq"] < seq:
            self.store.replace(AUDIT_HEAD, (json.dumps({"seq": seq, "sha256": sha}) + "\n").encode())

    def promote(self, ref: str, alias: str, gates_file: str | os.PathLike, *, force: bool = False,
                reason: str | None = None) -> PromoteResult:
        """Point `alias` at a version if it passes every gate (or with `force`), and log the decision.

        A refused promotion is logged too (action `refused`), so the log says who tried what.

        Args:
            ref: the version (`NAME:ID`, `NAME:ALIAS`, ...).
            alias: the alias to move (`production`, `staging`, ...).
            gates_file: the gates YAML.
            force: move the alias although gates failed (never past `gates.UNFORCEABLE`: the merged-model rules and
                an evaluation that contradicts itself); a refused forced attempt is logged with `force_requested`.
            reason: why (required with `force`; recorded either way).

        Returns:
            The decision with every gate's value, threshold and verdict.

        Raises:
            ConfigError: `force` without `reason`; a bad alias name; an unknown version; a bad gates file.
        """
        if force and not (reason and reason.strip()):
            raise ConfigError("--force needs --reason TEXT: a forced promotion is logged with why it was forced")
        _check_alias(alias)
        gates = load_gates(gates_file)
        version = self.resolve(ref)
        damaged = self.damage(version)
        if damaged:
            raise ConfigError(f"{version.ref} is damaged ({'; '.join(damaged)}): it cannot be promoted; run "
                              "`nemo-adapt registry verify` and add the artifact again")
        results = check_gates(gates, self.evidence(version))
        failed = [g for g in results if not g.passed]
        unforceable = [g for g in failed if g.gate in UNFORCEABLE]
        moved = not failed or (force and not unforceable)
        record = {"gates": {"file": str(gates.path), "name": gates.name, "sha256": gates.sha256,
                            "results": [g.as_dict() for g in results], "passed": not failed}}
        state: dict[str, Any] = {}

        def make(entries: list[dict]) -> dict | None:
            stack = self._stacks(entries).get((version.name, alias), [])
            state["previous"] = stack[-1] if stack else None
            if moved and state["previous"] == version.id:
                return None  # already there: nothing moves, nothing to log
            return {"action": "promote" if moved else "refused", "name": version.name, "alias": alias,
                    "from": state["previous"], "to": version.id, "who": who(), "when": _now(),
                    "forced": bool(moved and failed), "force_requested": force, "reason": reason, **record}

        entry = self._append(make)
        return PromoteResult(version, alias, state.get("previous"), results, moved, bool(moved and failed), entry)

    def rollback(self, ref: str, reason: str | None = None) -> dict:
        """Move an alias back to the version it pointed to before its last move (removed if there was none).

        Args:
            ref: `NAME:ALIAS`, or `ALIAS` alone when one name has it.
            reason: recorded in the audit log.

        Returns:
            The audit entry.

        Raises:
            ConfigError: an unknown name or alias, or an alias that is set for several names (`ALIAS` alone).
        """
        name, sep, alias = ref.partition(":")
        current = self.aliases()
        if not sep:
            alias, holders = name, [n for n, a in current.items() if name in a]
            if len(holders) != 1:
                every = sorted({a for per_name in current.values() for a in per_name})
                raise ConfigError(f"alias {alias!r} is set for {', '.join(holders)}: say which, e.g. "
                                  f"`rollback {holders[0]}:{alias}`" if holders else
                                  f"no artifact has an alias {alias!r}{_suggest(alias, every)} (aliases: "
                                  f"{', '.join(every) or 'none'})")
            name = holders[0]
        if name not in self.names():
            self.resolve(name)  # raises with the closest name
        if alias not in current.get(name, {}):
            have = sorted(current.get(name, {}))
            raise ConfigError(f"{name!r} has no alias {alias!r}{_suggest(alias, have)} (its aliases: "
                              f"{', '.join(have) or 'none'}): nothing to roll back")

        def make(entries: list[dict]) -> dict:
            stack = self._stacks(entries).get((name, alias), [])
            if not stack:
                raise ConfigError(f"{name}:{alias} was rolled back by another writer meanwhile; nothing left to roll back")
            return {"action": "rollback", "name": name, "alias": alias, "from": stack[-1],
                    "to": stack[-2] if len(stack) > 1 else None, "who": who(), "when": _now(), "forced": False,
                    "reason": reason}

        return self._append(make)

    # ---- checking

    def verify(self, ref: str | None = None) -> VerifyReport:
        """Re-hash every stored file of every version (or of one), and check manifests and the audit log.

        Returns:
            What was checked and every problem found (a file that is missing or does not match its sha256 is named
            with its version and path; a manifest whose id is not its content's; an audit entry out of sequence or
            whose `from` is not where its alias stood).
        """
        problems: list[str] = []
        notes: list[str] = []
        if ref:
            versions = [self.resolve(ref)]
        else:  # one damaged manifest is reported and the rest still checked
            versions = []
            for n in self.names():
                for entry in self.store.listdir(f"versions/{n}"):
                    if entry.endswith(".json") and re.fullmatch(r"[0-9a-f]{64}", entry[:-5]):
                        try:
                            v = self._load(n, entry[:-5])
                        except ConfigError as err:
                            problems.append(str(err).split("; run `")[0])
                            continue
                        if not isinstance(v.manifest, dict) or not isinstance(v.manifest.get("files"), dict):
                            problems.append(f"{self.store.url}/versions/{n}/{entry}: not a manifest (no files)")
                            continue
                        versions.append(v)
        hashed: dict[str, str | None] = {}  # sha256 -> problem (None: intact); a shared object is read once
        for v in versions:
            m = v.manifest
            found, noted = self._manifest_problems(v)
            problems += found
            notes += noted
            for rel, f in sorted((m.get("files") or {}).items()):
                if not isinstance(f, dict) or not isinstance(f.get("sha256"), str):
                    problems.append(f"{v.ref}: {rel} has no sha256 in the manifest (edited or damaged)")
                    continue
                sha = f["sha256"]
                if sha not in hashed:
                    hashed[sha] = self._check_object(sha, int(f.get("size") or 0))
                if hashed[sha]:
                    problems.append(f"{v.ref}: {rel} {hashed[sha]}")
            problems += self._check_evaluation(v, hashed) + self._base_problems(v, hashed)
        if ref is None:
            problems += self._check_audit({v.name: {x.id for x in versions if x.name == v.name} for v in versions})
            stored = {p.rsplit("/", 1)[-1] for p in self.store.find("objects/sha256")}
            orphans = stored - set(hashed)
            if orphans:
                notes.append(f"{len(orphans)} stored file(s) belong to no version (left by an interrupted add; "
                             "harmless, reused if the same file is added again)")
            left = self.store.leftovers()
            if left:
                notes.append(f"{len(left)} temporary file(s) under {self.store.url}/tmp from interrupted writes "
                             "(harmless; safe to delete when no add is running)")
        return VerifyReport(len(versions), len(hashed), problems, notes)

    def _manifest_problems(self, v: Version) -> tuple[list[str], list[str]]:
        """(problems, notes) of a manifest on its own: id, name and seal."""
        m, problems, notes = v.manifest, [], []
        if m.get("id") != v.id or version_id(m.get("kind"), m.get("files") or {}) != v.id:
            problems.append(f"{v.ref}: manifest does not match its id (edited or damaged)")
        if m.get("name") != v.name:
            problems.append(f"{v.ref}: the manifest names {m.get('name')!r}: copied or moved from another name")
        if "manifest_sha256" not in m:
            notes.append(f"{v.ref}: manifest without a seal (written before nemo-adapt sealed manifests); its "
                         "files are still checked")
        elif m["manifest_sha256"] != manifest_seal(m):
            problems.append(f"{v.ref}: manifest edited after it was written (its fields no longer match its "
                            "manifest_sha256)")
        return problems, notes

    def damage(self, v: Version) -> list[str]:
        """What `promote` checks before judging a version, without re-hashing its files (that is `verify`): the
        manifest's id, name and seal, and every stored file present with its recorded size."""
        problems = self._manifest_problems(v)[0]
        for rel, f in sorted((v.manifest.get("files") or {}).items()):
            size = self.store.size(object_path(f["sha256"])) if isinstance(f, dict) and "sha256" in f else None
            if size is None:
                problems.append(f"{rel} is missing from the store")
            elif size != f.get("size"):
                problems.append(f"{rel} has {size} bytes, the manifest says {f.get('size')}")
        return problems

    def _check_evaluation(self, v: Version, hashed: dict[str, str | None]) -> list[str]:
        """The stored eval.json (covered by the id) must be self-consistent and say what the manifest says of it."""
        m = v.manifest
        entry = (m.get("files") or {}).get(EVAL)
        if not isinstance(entry, dict):
            return [f"{v.ref}: the manifest records an evaluation but the version stores no {EVAL}"] \
                if m.get("evaluation") else []
        if hashed.get(entry.get("sha256")):
            return []  # already reported as damaged or missing
        try:
            result = json.loads(self.store.read(object_path(entry["sha256"])))
        except (ValueError, UnicodeDecodeError) as err:
            return [f"{v.ref}: stored {EVAL} is not JSON ({err})"]
        out = [f"{v.ref}: stored {EVAL}: {p}" for p in evaluation_problems(result)]
        if "evaluation" in m and _canonical(m["evaluation"]) != _canonical(evaluation_summary(result)):
            out.append(f"{v.ref}: the manifest's evaluation summary differs from its stored {EVAL} (edited)")
        return out

    def _base_problems(self, v: Version, hashed: dict[str, str | None]) -> list[str]:
        """The manifest's base-model fingerprint derived again from the stored file that records it (a run's
        results.json, an adapter's adapter_config.json)."""
        files, art = v.manifest.get("files") or {}, v.manifest.get("artifact") or {}
        for rel, key in (("results.json", "base_model_fingerprint"),
                         (f"{art.get('dir')}/adapter_config.json", "base_model_fingerprint")):
            entry = files.get(rel)
            if not isinstance(entry, dict) or hashed.get(entry.get("sha256")):
                continue
            try:
                recorded = json.loads(self.store.read(object_path(entry["sha256"])))
            except (ValueError, UnicodeDecodeError, FileNotFoundError):
                continue  # reported with the file itself
            recorded = recorded.get(key) or (recorded.get("nemo_adapt") or {}).get(key)
            claimed = (v.manifest.get("base_model") or {}).get("fingerprint")
            if recorded and recorded != claimed:
                return [f"{v.ref}: the manifest's base model {claimed} is not the {recorded} its stored {rel} records "
                        "(edited)"]
        return []

    def _check_object(self, sha: str, size: int) -> str | None:
        h, n = hashlib.sha256(), 0
        try:
            if size <= 64 * 2**20:  # one request on an object store; a large file is streamed instead
                data = self.store.read(object_path(sha))
                h.update(data)
                n = len(data)
            else:
                with self.store.open(object_path(sha)) as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                        n += len(block)
        except FileNotFoundError:
            return f"is missing from the store (sha256 {sha[:12]})"
        if h.hexdigest() != sha:
            return f"does not match its sha256 (stored {sha[:12]}, now {h.hexdigest()[:12]}, {n} of {size} bytes)"
        return None

    def _log_problems(self, files: list[tuple[str, dict | str]] | None = None) -> list[str]:
        """Where the audit log is not whole: unreadable entries, a gap in the numbering, a broken `prev` chain,
        and an `AUDIT_HEAD` that names an entry the log no longer has (deleted) or with other bytes (edited).
        Writers refuse to append to such a log (`_append`), so a damaged log is never written over."""
        problems = []
        files = self._audit_files() if files is None else files
        chained = False  # entries written before the log was chained have no `prev`; once one has, all must
        for i, (fname, e) in enumerate(files, 1):
            if isinstance(e, str):
                problems.append(f"audit entry {fname}: {e}")
                continue
            if e.get("seq") != i or fname != f"{i:08d}.json":
                problems.append(f"audit entry {i}: sequence number {e.get('seq')} in {fname} (entries missing or "
                                "duplicated)")
                break
            if "prev" in e:
                chained = True
                want = self._entry_sha.get(files[i - 2][0]) if i > 1 else None
                if e["prev"] != want:
                    problems.append(f"audit entry {i - 1} was edited or replaced after entry {i} was written "
                                    f"(entry {i}'s link to it no longer matches)")
            elif chained:
                problems.append(f"audit entry {i}: no link to the entry before it (written by hand?)")
        head = self._head()
        if head is not None:
            seq = head.get("seq")
            if head.get("damaged") or not isinstance(seq, int):
                problems.append(f"{AUDIT_HEAD} is damaged (not a JSON object with seq and sha256)")
            elif seq > len(files):
                problems.append(f"the audit log ends at entry {len(files)} but {AUDIT_HEAD} says entry {seq} was "
                                f"written: entr{'y' if seq == len(files) + 1 else 'ies'} {len(files) + 1}"
                                f"{f'-{seq}' if seq > len(files) + 1 else ''} deleted")
            elif seq >= 1 and self._entry_sha.get(files[seq - 1][0]) != head.get("sha256"):
                problems.append(f"audit entry {seq} was edited after it was written (its sha256 is not the one "
                                f"{AUDIT_HEAD} recorded)")
        elif chained:
            problems.append(f"{AUDIT_HEAD} is missing although the audit log is chained (deleted?)")
        return problems

    def _check_audit(self, known: dict[str, set[str]]) -> list[str]:
        """`_log_problems`, then each move checked against the versions and where its alias stood."""
        files = self._audit_files()
        problems = self._log_problems(files)
        stacks: dict[tuple[str, str], list[str]] = {}
        for i, (_, e) in enumerate(files, 1):
            if isinstance(e, str) or e.get("seq") != i:
                break
            stack = stacks.setdefault((e["name"], e["alias"]), [])
            top = stack[-1] if stack else None
            for field in ("to", "from"):
                vid = e.get(field)
                if vid is not None and vid not in known.get(e["name"], set()):
                    problems.append(f"audit entry {i}: {e['name']}:{str(vid)[:12]} is not a registered version")
            if e["action"] in ("promote", "rollback") and e.get("from") != top:
                problems.append(f"audit entry {i}: {e['name']}:{e['alias']} moved from {str(e.get('from'))[:12]} but "
                                f"stood at {str(top)[:12]} (a lost update)")
            if e["action"] == "promote":
                stack.append(e["to"])
            elif e["action"] == "rollback" and stack:
                stack.pop()
        return problems

    # ---- reading for people

    def lineage(self, ref: str) -> dict:
        """A version's parents (base model, dataset, recipe, init_from and merge parents, study) — each matched to
        a registered version where one holds the same weights — its children, and its alias history."""
        v = self.resolve(ref)
        by_weights = self._weights_index()
        parents = []
        for p in v.manifest.get("parents") or []:
            hit = by_weights.get(p.get("sha256")) if p.get("sha256") else None
            parents.append({**p, "registered": hit.ref if hit else None})
        mine = _weights_sha(v)
        children = []
        for n in self.names():
            for other in self.versions(n):
                if any(p.get("sha256") and p.get("sha256") == mine for p in other.manifest.get("parents") or []):
                    children.append(other.ref)
        history = [e for e in self.audit() if e["name"] == v.name and v.id in (e.get("to"), e.get("from"))]
        return {"version": v, "parents": parents, "children": children, "history": history,
                "aliases": sorted(a for a, i in self.aliases().get(v.name, {}).items() if i == v.id)}

    def _weights_index(self) -> dict[str, Version]:
        out = {}
        for n in self.names():
            for v in self.versions(n):
                sha = _weights_sha(v)
                if sha:
                    out.setdefault(sha, v)
        return out

    def get(self, ref: str, out: str | os.PathLike) -> tuple[Version, Path]:
        """Write a version's files to a new directory (hash-checked; atomic: the directory appears complete).

        Raises:
            ConfigError: `out` exists and is not empty; a stored file is damaged.
        """
        v = self.resolve(ref)
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {str(out)!r} exists and is not empty; name a new directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            for rel, f in v.manifest["files"].items():
                dest = staged / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.store.fetch(object_path(f["sha256"]), dest)
                except FileNotFoundError:
                    raise ConfigError(f"{v.ref}: stored {rel} is missing from the store (sha256 {f['sha256'][:12]}); "
                                      "run `nemo-adapt registry verify`") from None
                from nemo_adapt.data.fingerprint import sha256_file

                if sha256_file(dest) != f["sha256"]:
                    raise ConfigError(f"{v.ref}: stored {rel} does not match its sha256; run `nemo-adapt registry verify`")
            from nemo_adapt.file_modes import follow_umask

            follow_umask(staged)
            if out.exists():
                out.rmdir()
            os.replace(staged, out)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return v, out


def _merge_status(manifest: dict) -> str:
    """The merge's recorded status, as the merged-model rule judges it: `validated` only with what validation
    leaves behind (`nemo-adapt merge --validate`: one passing outcome per task, each with its score, n and
    threshold) and the merge's parents; a bare `status: validated` is not evidence."""
    merge = manifest.get("merge") or {}
    status = merge.get("status") or "unknown"
    if status != "validated":
        return status
    outcomes = merge.get("validation")
    if not isinstance(outcomes, list) or not outcomes or not all(
            isinstance(o, dict) and o.get("passed") is True and isinstance(o.get("n"), int) and o["n"] > 0
            and isinstance(o.get("exact_match"), int | float) and isinstance(o.get("threshold"), int | float)
            and o["exact_match"] >= o["threshold"] for o in outcomes):
        return "validated, but no passing validation outcomes (task, score, n, threshold) are recorded"
    if not manifest.get("parents"):
        return "validated, but the merge records no parents"
    return status


def _weights_sha(v: Version) -> str | None:
    """sha256 of a version's adapter weights (what merge configs and init_from name), or None."""
    art = v.manifest.get("artifact") or {}
    f = v.manifest["files"].get(f"{art.get('dir')}/adapter_model.safetensors")
    return f["sha256"] if f else None


def _check_alias(alias: str) -> None:
    if alias in RESERVED_ALIASES:
        raise ConfigError(f"alias {alias!r} is reserved (NAME:latest is always the newest version)")
    if len(alias) > 64:
        raise ConfigError(f"alias {alias[:20]!r}... is {len(alias)} characters long; at most 64")
    if not _ALIAS.match(alias) or _HEX.match(alias):
        raise ConfigError(f"alias {alias!r}: use lower-case letters, digits, '_' or '-', starting with a letter, and "
                          "not 4 or more hex digits alone (that reads as a version id)")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of nested mappings (lists are leaves), for diffs."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def diff(a: Version, b: Version) -> dict:
    """What differs between two versions: recipe keys, dataset, base model, metrics and files.

    Returns:
        {"config": {key: (a, b)}, "dataset": {field: (a, b)}, "base_model": {...}, "metrics": {metric: (a, b)},
         "files": {"added", "removed", "changed"}}.
    """
    ma, mb = a.manifest, b.manifest

    def changed(x: dict, y: dict) -> dict:
        return {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}

    fa, fb = ma["files"], mb["files"]
    ea, eb = ma.get("evaluation") or {}, mb.get("evaluation") or {}
    return {
        "config": changed(flatten(ma.get("recipe") or {}), flatten(mb.get("recipe") or {})),
        "dataset": changed(flatten(ma.get("dataset") or {}), flatten(mb.get("dataset") or {})),
        "base_model": changed(ma.get("base_model") or {}, mb.get("base_model") or {}),
        "metrics": changed({**flatten(ea.get("metrics") or {}), **{f"suite.{k}": v.get("pass") for k, v in
                                                                    (ea.get("suites") or {}).items()},
                            **flatten({"forgetting": ea.get("forgetting") or {}}), "n": ea.get("n")},
                           {**flatten(eb.get("metrics") or {}), **{f"suite.{k}": v.get("pass") for k, v in
                                                                   (eb.get("suites") or {}).items()},
                            **flatten({"forgetting": eb.get("forgetting") or {}}), "n": eb.get("n")}),
        "files": {"added": sorted(set(fb) - set(fa)), "removed": sorted(set(fa) - set(fb)),
                  "changed": sorted(k for k in set(fa) & set(fb) if fa[k]["sha256"] != fb[k]["sha256"])},
    }


# --------------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_link(manifest: dict, scanned: Scanned, environ: dict | None = None) -> dict | None:
    """With W&B online, log the version's files as a W&B artifact and return the link to record; else None.

    Online means what a run means by it (`logging.run_logger.resolve_wandb_mode("auto")`): WANDB_API_KEY set, or
    WANDB_MODE=online. Offline, `wandb` is not even imported: nothing is written anywhere. The project and entity
    are the version's recipe's (`logging.wandb_project`, `logging.wandb_entity`), WANDB_PROJECT/WANDB_ENTITY
    overriding, as for a run. A failure to log is a warning, never a failed add.
    """
    from nemo_adapt.logging.run_logger import resolve_wandb_mode

    if resolve_wandb_mode("auto", environ) != "online":
        return None
    unreachable = wandb_unreachable(environ)
    if unreachable:
        import warnings

        from nemo_adapt.artifacts.registry_store import RegistryWarning

        warnings.warn(f"W&B artifact not logged: {unreachable}; the registry version is complete without it",
                      RegistryWarning, stacklevel=2)
        return None
    return log_wandb_artifact(manifest, scanned, mode="online", environ=environ)


def wandb_unreachable(environ: dict | None = None, timeout_s: float = 5.0) -> str | None:
    """Why the W&B server cannot be reached (one TCP connect, `timeout_s` seconds at most), or None.

    `wandb.init` online waits up to 90 s (its init_timeout) and retries before giving up; on a cluster node
    without internet access that is minutes per `registry add`. One connect to WANDB_BASE_URL's host answers in
    seconds.
    """
    from urllib.parse import urlsplit

    url = (os.environ if environ is None else environ).get("WANDB_BASE_URL") or "https://api.wandb.ai"
    parts = urlsplit(url if "://" in url else f"https://{url}")
    host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return f"WANDB_BASE_URL={url!r} names no host"
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{host}:{port} is unreachable ({type(err).__name__}: {err})"
    return None


def log_wandb_artifact(manifest: dict, scanned: Scanned, mode: str, environ: dict | None = None) -> dict | None:
    """Log a version as a W&B artifact in `mode` (online; offline for tests) and return {artifact, version, url, run}.

    The artifact's metadata is the manifest without its file list, scrubbed of secrets (`logging.scrub`).
    """
    import warnings

    from nemo_adapt.artifacts.registry_store import RegistryWarning
    from nemo_adapt.logging.scrub import scrub

    env = os.environ if environ is None else environ
    logging_cfg = (manifest.get("recipe") or {}).get("logging") or {}
    project = env.get("WANDB_PROJECT") or logging_cfg.get("wandb_project") or "nemo-adapt"
    entity = env.get("WANDB_ENTITY") or logging_cfg.get("wandb_entity")
    # W&B keeps a local copy of the run: in WANDB_DIR when set, else in a temporary directory removed afterwards
    # (not a wandb/ folder left wherever `registry add` was run).
    local = env.get("WANDB_DIR") or tempfile.mkdtemp(prefix="nemo-adapt-wandb-")
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, job_type="registry-add", mode=mode, dir=local,
                         name=f"registry-add-{manifest['name']}", config=scrub({"version": manifest["id"]}))
        try:
            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "_", manifest["name"]),
                                      type="adapter" if manifest["artifact"]["kind"] == "adapter" else "model",
                                      description=f"nemo-adapt registry version {manifest['id'][:12]}",
                                      metadata=scrub({k: v for k, v in manifest.items() if k not in ("files", "wandb")}))
            for rel, src in sorted(scanned.files.items()):
                artifact.add_file(str(src), name=rel)
            run.log_artifact(artifact, aliases=[f"registry-{manifest['id'][:12]}"])
            if mode == "online":
                artifact.wait()
            # An offline artifact has no server-side name, version or URL yet (`wandb sync` gives them).
            link = {"artifact": _attr(artifact, "qualified_name") if mode == "online" else None,
                    "version": _attr(artifact, "version") if mode == "online" else None,
                    "url": _attr(artifact, "url") if mode == "online" else None,
                    "run": _attr(run, "url"), "project": project, "entity": entity, "mode": mode}
        finally:
            run.finish()
        return link
    except Exception as err:  # W&B is the mirror, not the record: the registry version stands without it
        warnings.warn(f"W&B artifact not logged ({type(err).__name__}: {err}); the registry version is complete "
                      "without it", RegistryWarning, stacklevel=2)
        return None
    finally:
        if not env.get("WANDB_DIR"):
            shutil.rmtree(local, ignore_errors=True)


def _attr(obj: Any, name: str) -> Any:
    """An attribute W&B may not have (older releases) or may refuse to give before the upload is done."""
    try:
        return getattr(obj, name, None)
    except Exception:  # wandb raises its own errors for unavailable fields
        return None
