"""`nemo-adapt merge MERGE.yaml`: merge fine-tuned checkpoints of one base model into a Hugging Face directory.

A merge file, in the spirit of mergekit's:

    merge_method: ties                  # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp
    base_model: /ckpt/Llama-3-8B        # the shared base (methods on task vectors need it)
    models:
      - {model: /ckpt/llama3-8b-support, weight: 1.0, density: 0.5}
      - {model: /ckpt/llama3-8b-legal,   weight: 0.5, density: 0.5}
    parameters: {lambda: 1.0, normalize: true, seed: 0}   # t for slerp
    dtype: bfloat16                     # float32 | bfloat16 | float16
    out: merged/llama3-8b-support-legal

Models are Hugging Face directories, .gguf files, `embedded:smollm2_135m`, or adapter directories (ours or
Hugging Face PEFT; LoRA, DoRA, IA3), which take part as their base with the adapter folded in; adapters must
all belong to one base model (fingerprints), `base_model` when it is given. Everything is checked before
anything is written (method, keys, architectures and every tensor's presence and shape); tensors are then
streamed: a few MiB of rows per input at a time (whole tensors for SLERP), merged in fp32, cast to `dtype` and
written straight into the shards.
The output appears only when complete: the merged weights, config, tokenizer, and `merge_config.json`
with the lineage (every parent's fingerprint, method, parameters, code version) and `status: unvalidated`.
`--validate RUN_DIR` (repeatable) scores the result on each run's test split right after merging and records
the scores, thresholds and `status: validated` or `failed_validation` (exit status 1) in merge_config.json.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nemo_adapt.errors import ConfigError
from nemo_adapt.provenance import code_version

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MergeModel:
    """One fine-tuned model to merge."""

    model: str
    """Checkpoint: a Hugging Face directory, a .gguf file, `embedded:smollm2_135m`, or an adapter directory."""
    weight: float = 1.0
    """Its weight in the weighted sum."""
    density: float = 1.0
    """Share of its task-vector entries kept (TIES trims, DARE drops at random); 1 keeps all."""


@dataclass
class MergeConfig:
    """A validated merge file."""

    merge_method: str
    models: list[MergeModel]
    out: Path
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str = "bfloat16"
    source: Path | None = None


_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out")
_MODEL_KEYS = ("model", "weight", "density")
_PARAM_KEYS = {"lambda": "lambda_", "normalize": "normalize", "t": "t", "seed": "seed"}


def _unknown(key: str, allowed, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}.{hint} Allowed: {', '.join(allowed)}")


def load_merge_config(path: str | Path, out: str | None = None) -> MergeConfig:
    """Read and validate a merge file (nothing is opened but the file itself).

    Raises:
        ConfigError: naming the file, the key and what is allowed.
    """
    import yaml

    from nemo_adapt.merge import get_merge_method

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"merge file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, str(path))
    for key in ("merge_method", "models"):
        if key not in data:
            raise ConfigError(f"{path}: `{key}` is required")
    method = get_merge_method(str(data["merge_method"]))
    models_raw = data["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{path}: `models` must be a non-empty list of {{model: PATH, weight, density}}")
    models = []
    for i, entry in enumerate(models_raw):
        where = f"{path}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where} must be a mapping with `model` (a checkpoint path)")
        for key in entry:
            if key not in _MODEL_KEYS:
                raise _unknown(key, _MODEL_KEYS, where)
        m = MergeModel(str(entry["model"]), entry.get("weight", 1.0), entry.get("density", 1.0))
        if not isinstance(m.weight, int | float) or isinstance(m.weight, bool):
            raise ConfigError(f"{where}.weight={m.weight!r} must be a number")
        if not isinstance(m.density, int | float) or not 0 < m.density <= 1:
            raise ConfigError(f"{where}.density={m.density!r} must be in (0, 1]")
        models.append(m)
    if method.num_models is not None and len(models) != method.num_models:
        raise ConfigError(f"{path}: merge_method={method.name} merges exactly {method.num_models} models, "
                          f"`models` lists {len(models)}")
    base = data.get("base_model")
    if method.needs_base and not base:
        raise ConfigError(f"{path}: merge_method={method.name} works on task vectors (model - base): set base_model")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: `parameters` must be a mapping ({', '.join(_PARAM_KEYS)})")
    for key in params:
        if key not in _PARAM_KEYS:
            raise _unknown(key, _PARAM_KEYS, f"{path}: parameters")
    from nemo_adapt.merge import MergeParams

    try:
        merge_params = MergeParams(**{_PARAM_KEYS[k]: v for k, v in params.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: parameters: {err}") from None
    problem = method.check([float(m.weight) for m in models], merge_params) if method.check else None
    if problem:
        raise ConfigError(f"{path}: merge_method={method.name}: {problem}")
    dtype = str(data.get("dtype", "bfloat16"))
    if dtype not in DTYPES:
        raise ConfigError(f"{path}: dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    out_dir = out or data.get("out")
    if not out_dir:
        raise ConfigError(f"{path}: `out` (the output directory) is required, or pass --out")
    for i, m in enumerate(models):
        if ":" not in m.model and not Path(m.model).exists():  # embedded:/random: names are resolved later
            raise ConfigError(f"{path}: models[{i}].model={m.model!r} does not exist; give a checkpoint (Hugging Face "
                              "directory, .gguf file) or an adapter directory (ours or Hugging Face PEFT)")
    return MergeConfig(method.name, models, Path(out_dir), str(base) if base else None, dict(params), dtype, path)


def run_merge(cfg: MergeConfig, progress: bool = True) -> Path:
    """Merge as `cfg` says and write the output directory (see the module docstring).

    Returns:
        The output directory.

    Raises:
        CheckpointError / ConfigError: a parent cannot be opened, architectures differ, a tensor is missing
            or misshapen; raised before anything is written.
    """
    import dataclasses
    import functools
    import math

    import torch

    from nemo_adapt.merge import MergeParams, get_merge_method
    from nemo_adapt.merge.adapter_parent import AdapterParent, is_adapter_dir
    from nemo_adapt.merge.methods import MagnitudeTrim, block_seed
    from nemo_adapt.models import hf
    from nemo_adapt.models.hf import check_spec_matches
    from nemo_adapt.models.loader import base_fingerprint, open_source
    from nemo_adapt.models.weights import hf_shapes

    method = get_merge_method(cfg.merge_method)
    params = MergeParams(**{_PARAM_KEYS[k]: v for k, v in cfg.parameters.items()})
    dtype = getattr(torch, cfg.dtype)

    # Open every parent (config and tensor index; no weights) and check they share one architecture; an
    # adapter parent is its base with the adapter folded in, and every adapter must have the merge's base.
    base = open_source(cfg.base_model) if cfg.base_model else None
    parents = [AdapterParent(m.model, cfg.base_model) if is_adapter_dir(m.model) else open_source(m.model)
               for m in cfg.models]
    adapters = [(m, p) for m, p in zip(cfg.models, parents) if isinstance(p, AdapterParent)]
    bases = {p.base_fingerprint for _, p in adapters}
    if len(bases) > 1:
        said = "; ".join(f"{m.model!r} on {p.base_model_fingerprint_text()}" for m, p in adapters)
        raise ConfigError(f"{cfg.source or 'merge'}: the adapters belong to different base models ({said}); "
                          "merged models must share one base")
    ref = base or parents[0]
    spec = ref.spec
    for m, src in zip(cfg.models, parents):
        check_spec_matches(spec, src.spec, f"model {m.model!r} (the merge's reference is {ref.location!r})")
    shapes = hf_shapes(spec)

    shards = hf.plan_shards(shapes, dtype)

    out = cfg.out.resolve()
    hf.check_replaceable(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = [float(m.weight) for m in cfg.models]
        densities = [float(m.density) for m in cfg.models]
        done, total, start = 0, len(shapes), time.perf_counter()
        tty = sys.stderr.isatty()
        for i, names in enumerate(shards):
            writer = hf.ShardWriter(tmp / hf.shard_name(i, len(shards)), {n: shapes[n] for n in names}, dtype)
            for name in names:
                # Elementwise methods take a few MiB of rows of every input at a time; the others one whole
                # tensor per input (fp32). Each block is merged, cast and written at once: nothing accumulates.
                blocks = _blocks(shapes[name], method.elementwise)
                trims = None
                if method.trims_by_magnitude:  # TIES: each task vector's trim threshold first, block by block
                    trims = [MagnitudeTrim(functools.partial(_task_vector_blocks, src, base, name, blocks),
                                           math.prod(shapes[name]), rho) for src, rho in zip(parents, densities)]
                for a, b in blocks:
                    tensors = [read_rows(src, name, a, b) for src in parents]
                    base_t = read_rows(base, name, a, b) if base is not None else None
                    block_densities = densities
                    if trims is not None:
                        tensors = [base_t + trim.apply(t - base_t) for t, trim in zip(tensors, trims)]
                        block_densities = [1.0] * len(tensors)  # trimmed already
                    block_params = dataclasses.replace(params, seed=block_seed(params.seed, name, a))
                    writer.write(name, method.fn(base_t, tensors, weights, block_densities, block_params))
                    del tensors, base_t
                done += 1
                if progress and (done % 20 == 0 or done == total):
                    # One line rewritten in place on a terminal; whole lines in a log file or pipe.
                    line = f"merge: {done}/{total} tensors, {time.perf_counter() - start:.0f} s"
                    if tty:
                        print(f"\r{line}", end="", file=sys.stderr, flush=True)
                    else:
                        print(line, file=sys.stderr, flush=True)
            writer.close()
        if progress and tty:
            print(file=sys.stderr, flush=True)
        hf.write_metadata(tmp, spec, len(shards), dtype)
        tokenizer_from = _save_tokenizer(ref, tmp)
        lineage = {
            "status": "unvalidated",
            "merge_method": method.name, "paper": method.paper,
            "parameters": {"lambda": params.lambda_, "normalize": params.normalize, "t": params.t, "seed": params.seed},
            "dtype": cfg.dtype,
            "base_model": ({"model": cfg.base_model, "fingerprint": base_fingerprint(base)} if base else None),
            "models": [{"model": m.model, "weight": m.weight, "density": m.density,
                        **({"fingerprint": base_fingerprint(src)} if not isinstance(src, AdapterParent) else
                           {"fingerprint": f"adapter@{src.lineage['sha256'][:16]}", **src.lineage})}
                       for m, src in zip(cfg.models, parents)],
            "architecture": spec.name,
            "tokenizer": tokenizer_from,
            "merge_file": str(cfg.source) if cfg.source else None,
            "code_version": code_version(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        (tmp / "merge_config.json").write_text(json.dumps(lineage, indent=2) + "\n")
        hf.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never a partial output directory
        raise
    return out


@dataclass
class ValidationTask:
    """One task a merge is validated on (`--validate RUN_DIR`): its test split, and the score to reach."""

    run_dir: Path
    cfg: object
    records: list
    threshold: float
    threshold_from: str


def plan_validation(run_dirs: list[str], min_exact_match: float | None) -> list[ValidationTask]:
    """Check the validation tasks before merging: each a run directory whose test split the merge is scored on.

    A task passes when the merged model's exact match reaches `min_exact_match`, or, without it, the run's own
    recorded prompt-only baseline (results.json): a merge that cannot beat prompting the base is no use.

    Raises:
        ConfigError: not a run directory, no test split, or no threshold (no --min-exact-match and no baseline
            recorded by the run).
    """
    from nemo_adapt.eval.cli import load_task

    tasks = []
    for run_dir in run_dirs:
        cfg, records = load_task(run_dir)
        if min_exact_match is not None:
            threshold, said = float(min_exact_match), "--min-exact-match"
        else:
            results = Path(run_dir) / "results.json"
            baseline = None
            if results.is_file():
                recorded = json.loads(results.read_text()).get("eval") or {}  # what `nemo-adapt run` scored
                baseline = (recorded.get("baseline") or {}).get("exact_match")
            if baseline is None:
                raise ConfigError(f"--validate {run_dir}: the run recorded no prompt-only baseline ({results}); "
                                  "give the score to reach with --min-exact-match")
            threshold, said = float(baseline), f"the prompt-only baseline of {results}"
        tasks.append(ValidationTask(Path(run_dir), cfg, records, threshold, said))
    return tasks


def validate_merge(out: Path, tasks: list[ValidationTask], max_examples: int | None = None) -> bool:
    """Score the merged model on each task, record the outcome in its merge_config.json and print it.

    The status becomes `validated` when every task reaches its threshold, else `failed_validation`; the file is
    replaced atomically, so it always holds one complete record.

    Returns:
        Whether every task passed.
    """
    import hashlib
    import os

    from nemo_adapt.eval.cli import evaluate_on_task

    outcomes = []
    for task in tasks:
        result = evaluate_on_task(task.cfg, task.records, checkpoint=str(out), model_name=task.cfg.model.name,
                                  max_examples=max_examples, label="merged")
        passed = result["exact_match"] >= task.threshold
        digest = hashlib.sha256(Path(task.cfg.data.test).read_bytes()).hexdigest()
        outcomes.append({"suite": str(task.run_dir), "test_split": task.cfg.data.test, "test_sha256": digest,
                         "exact_match": result["exact_match"], "correct": result["correct"], "n": result["n"],
                         "threshold": task.threshold, "threshold_from": task.threshold_from, "passed": passed})
        print(f"validate {task.run_dir}: exact match {result['exact_match']:.3f} ({result['correct']}/{result['n']}) "
              f"{'>=' if passed else '<'} {task.threshold:.3f} ({task.threshold_from}): "
              f"{'pass' if passed else 'FAIL'}", flush=True)
    record_path = out / "merge_config.json"
    record = json.loads(record_path.read_text())
    ok = all(o["passed"] for o in outcomes)
    record.update(status="validated" if ok else "failed_validation", validation=outcomes,
                  validated=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    tmp = record_path.with_name(".merge_config.json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, record_path)
    return ok


BLOCK_BYTES = 4 * 2**20
"""Float32 bytes of one input's block of rows when a method is elementwise (a few MiB: the peak stays a
small multiple of it per input, whatever the model's size)."""


def _blocks(shape: tuple[int, ...], elementwise: bool) -> list[tuple[int, int]]:
    """Row ranges [a, b) covering a tensor's first dimension: BLOCK_BYTES per block for elementwise methods,
    one range (the whole tensor) otherwise."""
    import math

    rows = shape[0] if shape else 1
    if not elementwise or not shape:
        return [(0, rows)]
    step = max(1, BLOCK_BYTES // (4 * math.prod(shape[1:])))  # float32 bytes per row
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _task_vector_blocks(src, base, name: str, blocks: list[tuple[int, int]]):
    """The task vector (model - base) of tensor `name`, block by block."""
    for a, b in blocks:
        yield read_rows(src, name, a, b) - read_rows(base, name, a, b)


def read_rows(src, name: str, start: int, stop: int):
    """Rows [start, stop) of tensor `name` of a merge input (an opened checkpoint or an adapter parent),
    float32, reading no more of the file than the source allows (safetensors: only those rows)."""
    if hasattr(src, "rows"):  # an adapter parent
        return src.rows(name, start, stop)
    tensors = src.tensors
    if hasattr(tensors, "rows"):
        return tensors.rows(name, start, stop)
    return tensors(name)[start:stop]


def _save_tokenizer(source, directory: Path) -> str | None:
    """Save the reference checkpoint's tokenizer with the merge (returns where it came from, or None)."""
    from nemo_adapt.tokenizer import tokenizer_if_any

    tokenizer = tokenizer_if_any(source.tokenizer_path, source.location, "merge")
    if tokenizer is None:
        return None
    tokenizer.save_pretrained(str(directory))
    return source.location


def register(sub) -> None:
    import argparse

    p = sub.add_parser("merge", help="merge fine-tuned checkpoints of one base model (linear, task arithmetic, "
                                     "TIES, DARE, SLERP)", description=__doc__.split("`nemo-adapt merge MERGE.yaml`: ")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("merge_file", help="merge YAML (see `nemo-adapt merge --help` and README)")
    p.add_argument("--out", help="output directory (overrides the file's `out`)")
    p.add_argument("--validate", action="append", default=[], metavar="RUN_DIR",
                   help="score the merged model on this run's test split right after merging (repeatable); "
                        "merge_config.json then says validated or failed_validation")
    p.add_argument("--min-exact-match", type=float, default=None,
                   help="with --validate: the exact match each task must reach (default: the run's recorded "
                        "prompt-only baseline)")
    p.add_argument("--max-examples", type=int, default=None, help="with --validate: at most this many test examples")

    def run(args) -> int:
        cfg = load_merge_config(args.merge_file, args.out)
        if args.min_exact_match is not None and not args.validate:
            raise ConfigError("--min-exact-match is the score --validate RUN_DIR must reach; pass --validate")
        tasks = plan_validation(args.validate, args.min_exact_match)  # checked before anything is written
        out = run_merge(cfg)
        if not tasks:
            print(f"merged {len(cfg.models)} model(s) with {cfg.merge_method} into {out} "
                  f"(status unvalidated: evaluate it before use, or merge with --validate RUN_DIR)", flush=True)
            return 0
        ok = validate_merge(out, tasks, args.max_examples)
        print(f"merged {len(cfg.models)} model(s) with {cfg.merge_method} into {out} "
              f"(status {'validated' if ok else 'failed_validation'})", flush=True)
        return 0 if ok else 1

    p.set_defaults(func=run)
