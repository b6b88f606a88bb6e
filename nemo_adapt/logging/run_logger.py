"""RunLogger: what a training run reports while it runs, and where.

One object per process; only the main rank (global rank 0) does anything, every other rank gets a
no-op built by the same constructor with `is_main=False`, so the training loop calls it unguarded.

Outputs, all under the run directory:

  metrics.jsonl     one JSON object per line, appended: `{"step", "time", **metrics}` for `log`,
                    `{"step", "time", "event", **fields}` for `event`. Survives restarts; the trainer
                    drops the records a crashed attempt wrote past its checkpoint with `truncate_after`.
                    Non-finite floats are written as Python's json writes them (NaN, Infinity).
  run_summary.json  the merged `update_summary` values (final eval scores), also without W&B.
  wandb/            W&B's files (offline runs are synced later with `wandb sync run_dir/wandb/offline-run-*`).
  wandb_run_id      the W&B run id chosen on the first start; later starts continue that run.
  restarts          how many times the run was started again after the first start.
  loss_curve.png    written by `close()`.

Secrets never reach these files or W&B: every config value, metric, event field and summary value
is passed through `nemo_adapt.logging.scrub.scrub`, and environment variables are never logged.

Monitoring must never stop a training run: a W&B failure after start-up is reported once and W&B is
switched off for the rest of the run; metrics.jsonl keeps going.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_adapt.logging.loss_curve import TRAIN_LOSS, VAL_LOSS, write_loss_curve
from nemo_adapt.logging.scrub import scrub, secret_env_values

if TYPE_CHECKING:
    from nemo_adapt.config.schema import LoggingConfig

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "run_summary.json"
RUN_ID_FILE = "wandb_run_id"
RESTARTS_FILE = "restarts"
LOSS_CURVE_FILE = "loss_curve.png"
RESTARTS_KEY = "run/restarts"

# Keys every metrics.jsonl record owns; a metric or event field with one of these names would
# silently overwrite them.
_RESERVED = frozenset({"step", "time", "event"})
_TRUE = frozenset({"1", "true", "yes", "on"})
# W&B accepts [a-z0-9] run ids; 8 characters as W&B's own ids (36^8 ~ 2.8e12, collisions negligible).
_RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
_ENV_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def resolve_wandb_mode(config_mode: str, environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode a run uses: `online`, `offline` or `disabled`.

    The standard environment variables win over the recipe, as they do for project/entity/group:
    WANDB_DISABLED=true gives `disabled`; WANDB_MODE (online/offline/disabled, or the old names
    run/dryrun) gives that mode. Otherwise `auto` is online when WANDB_API_KEY is set, offline when not.

    Args:
        config_mode: `logging.wandb_mode` (auto, online, offline, disabled).
        environ: Environment to read (default: `os.environ`).

    Returns:
        The resolved mode.

    Raises:
        ValueError: `config_mode` is not one of the four values.
    """
    env = os.environ if environ is None else environ
    if config_mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logging.wandb_mode={config_mode!r}; choose auto, online, offline or disabled")
    if env.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled"
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in _ENV_MODES:
        return _ENV_MODES[env_mode]
    if config_mode == "auto":
        return "online" if env.get("WANDB_API_KEY") else "offline"
    return config_mode


def resolve_wandb_identity(
    cfg: LoggingConfig, run_name: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Project, entity, name, group and tags of the W&B run, with the standard env vars applied.

    WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME and WANDB_RUN_GROUP replace the recipe's values;
    WANDB_TAGS (comma-separated) adds tags after the recipe's, without duplicates.

    Args:
        cfg: The `logging` section.
        run_name: `run.name`, the default W&B run name.
        environ: Environment to read (default: `os.environ`).

    Returns:
        Keyword arguments for `wandb.init`: project, entity, name, group, tags.
    """
    env = os.environ if environ is None else environ
    tags = list(cfg.wandb_tags)
    for tag in env.get("WANDB_TAGS", "").split(","):
        if tag.strip() and tag.strip() not in tags:
            tags.append(tag.strip())
    return {
        "project": env.get("WANDB_PROJECT") or cfg.wandb_project,
        "entity": env.get("WANDB_ENTITY") or cfg.wandb_entity,
        "name": env.get("WANDB_NAME") or cfg.wandb_name or run_name,
        "group": env.get("WANDB_RUN_GROUP") or cfg.wandb_group,
        "tags": tags,
    }


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; unreadable lines (a torn last line) are skipped.

    Args:
        path: The metrics.jsonl file.

    Returns:
        Records in file order ([] when the file does not exist).
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    # newline="\n": JSONL lines end at "\n" only; universal newlines would also split at a "\r".
    with path.open(encoding="utf-8", newline="\n") as f:
        for line in f:
            record = _parse_line(line)
            if record is not None:
                records.append(record)
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Rewrite a metrics.jsonl keeping only records with `step <= step`, atomically.

    The new content is written to a temporary file in the same directory, fsynced, then renamed
    over the old file, so a crash mid-way leaves either the old or the new file, never a mix.
    Unreadable lines are dropped too.

    Args:
        path: The metrics.jsonl file (nothing happens when it does not exist).
        step: Last step to keep.

    Returns:
        How many lines were dropped.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    with path.open(encoding="utf-8", newline="\n") as f:  # lines end at "\n" only, as in read_metrics
        for line in f:
            record = _parse_line(line)
            if record is not None and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    _atomic_write_text(path, "".join(kept))
    return dropped


class RunLogger:
    """Metrics, events and summary of one training run: metrics.jsonl, W&B, a progress bar, a loss plot.

    Usage (every rank, unguarded; only `is_main=True` does anything):

        logger = RunLogger(cfg.logging, run_dir=run_dir, run_name=cfg.run.name, config_dict=resolved,
                           is_main=rank == 0, total_steps=max_steps, start_step=ckpt_step)
        logger.truncate_after(ckpt_step)           # on resume: forget what the crashed attempt logged later
        logger.log(step, {"train/loss": loss, "train/lr": lr, ...})
        logger.event("resumed", step=ckpt_step, restarts=logger.restarts)
        logger.update_summary({"eval/exact_match": 0.8})
        logger.close()

    Restarts: the first start writes `wandb_run_id`; each later start on the same run directory
    finds it, continues that W&B run (`resume="allow"`), increments `restarts` and logs the count as
    `run/restarts` (a metrics.jsonl record at `start_step`, W&B history and summary).

    Attributes:
        run_dir: The run directory.
        run_id: W&B run id (also kept when W&B is disabled, so enabling it later continues the run);
            None on non-main ranks.
        restarts: Starts after the first one (0 on a fresh run and on non-main ranks).
        wandb_mode: `online`, `offline` or `disabled` as resolved (None on non-main ranks);
            `disabled` too when W&B could not start or failed later.
        loss_curve_path: The PNG `close()` wrote, if any.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: str | Path,
        run_name: str,
        config_dict: Mapping[str, Any] | None = None,
        is_main: bool = True,
        total_steps: int | None = None,
        start_step: int = 0,
        *,
        echo: bool = True,
    ) -> None:
        """Start logging (main rank): repair metrics.jsonl, count the restart, start W&B and the bar.

        Args:
            cfg: The `logging` section of the recipe.
            run_dir: Run directory (created if missing).
            run_name: `run.name`: default W&B name, plot title, progress bar label.
            config_dict: The resolved recipe as plain data, logged as the W&B config (secrets scrubbed).
            is_main: Whether this process is global rank 0; other ranks get a no-op logger.
            total_steps: Steps the run will reach (for the bar's total and ETA); None when unknown.
            start_step: The step the run starts from: 0 when fresh, the checkpoint's step on resume.
            echo: When no progress bar is shown, print one line per `log` call to stderr (the Slurm
                output file then shows progress). Events are always printed.

        Raises:
            ValueError: `cfg.wandb_mode` is not a known mode.
        """
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self.echo = echo
        self.run_id: str | None = None
        self.restarts = 0
        self.wandb_mode: str | None = None
        self.loss_curve_path: Path | None = None
        self._wandb_run: Any = None
        self._bar: Any = None
        self._closed = False
        self._last_step = start_step
        self._summary: dict[str, Any] = {}
        self._env_secrets: list[str] = []
        self.metrics_path = self.run_dir / METRICS_FILE
        if not is_main:
            return

        # Secret environment values are read once: scrubbing runs on every log call.
        self._env_secrets = secret_env_values()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _repair_torn_tail(self.metrics_path)
        self._summary = _read_summary(self.run_dir / SUMMARY_FILE)
        self.run_id, self.restarts = self._claim_run_id()
        self.wandb_mode = resolve_wandb_mode(cfg.wandb_mode)
        if self.wandb_mode != "disabled":
            self._wandb_run = self._start_wandb(config_dict or {})
            if self._wandb_run is None:
                self.wandb_mode = "disabled"
        self._bar = self._start_bar()

        self._append({"step": start_step, "time": time.time(), RESTARTS_KEY: self.restarts})
        self._wandb_log(start_step, {RESTARTS_KEY: self.restarts})
        self._wandb_call(lambda run: run.summary.update({RESTARTS_KEY: self.restarts}))

    # ----------------------------------------------------------------------------------------------
    # Public API

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record metrics at a step: metrics.jsonl, W&B history, the progress bar.

        Values may be Python numbers, strings, or 0-d tensors/NumPy scalars (converted with `.item()`).
        W&B history only moves forward: a step below the W&B run's current step (a resumed online
        run that had logged further before it crashed) is kept in metrics.jsonl but not sent to W&B.

        Args:
            step: Optimizer step the metrics belong to.
            metrics: Name -> value, e.g. `{"train/loss": 2.31, "train/lr": 1e-4}`.

        Raises:
            ValueError: A metric is called `step`, `time` or `event` (reserved record keys).
        """
        if not self.is_main or self._closed:
            return
        _check_reserved(metrics, "metric")
        clean = self._clean(metrics)
        self._append({"step": step, "time": time.time(), **clean})
        self._wandb_log(step, clean)
        self._last_step = max(self._last_step, step)
        self._show(step, clean)

    def event(self, name: str, step: int | None = None, **fields: Any) -> None:
        """Record a text event (resumed, preempted, checkpoint saved, ...).

        Goes to metrics.jsonl as `{"step", "time", "event": name, **fields}`; to W&B as the text
        history value `event/<name>` = "name step=... key=value ..." (the summary shows the latest
        occurrence; no W&B alert is raised); and as one line on stderr, which W&B keeps in the run's logs.

        Args:
            name: Event name, e.g. `resumed`.
            step: Step it happened at (default: the last step logged, or `start_step`).
            **fields: Details, e.g. `restarts=1`; secret-looking names are redacted.

        Raises:
            ValueError: A field is called `time` or `event`.
        """
        if not self.is_main or self._closed:
            return
        _check_reserved(fields, "event field")
        step = self._last_step if step is None else step
        clean = self._clean(fields)
        self._append({"step": step, "time": time.time(), "event": name, **clean})
        text = " ".join([name, f"step={step}", *(f"{k}={v}" for k, v in clean.items())])
        # W&B copies the latest history value of each key into the summary, so `event/<name>` in the
        # summary is the latest occurrence without a separate update (which the history would overwrite).
        self._wandb_log(step, {f"event/{name}": text})
        self._console(f"[{self.run_name}] event {text}")

    def update_summary(self, values: Mapping[str, Any]) -> None:
        """Set final values of the run (eval scores): the W&B summary and run_summary.json.

        Args:
            values: Name -> value, e.g. `{"eval/exact_match": 0.8}`; merged over earlier calls.
        """
        if not self.is_main or self._closed:
            return
        clean = self._clean(values)
        self._summary.update(clean)
        _atomic_write_text(
            self.run_dir / SUMMARY_FILE, json.dumps(self._summary, indent=2, default=str) + "\n"
        )
        self._wandb_call(lambda run: run.summary.update(clean))

    def truncate_after(self, step: int) -> int:
        """Drop metrics.jsonl records with a step after `step` (see `truncate_metrics`).

        Call on resume with the checkpoint's step: a crashed attempt may have logged steps past its
        last checkpoint, which the resumed run logs again. The restart record this logger wrote at
        `start_step` survives when `step >= start_step`. W&B history cannot be rewound this way;
        `log` just skips steps W&B already has.

        Args:
            step: Last step to keep.

        Returns:
            How many records were dropped (0 on non-main ranks).
        """
        if not self.is_main:
            return 0
        dropped = truncate_metrics(self.metrics_path, step)
        self._last_step = min(self._last_step, step)
        return dropped

    def close(self, exit_code: int = 0) -> None:
        """Finish: close the progress bar, finish the W&B run, write loss_curve.png. Idempotent.

        The plot is drawn from metrics.jsonl, so it covers every start of a resumed run. A plotting
        failure is reported as a warning: the run's results are already saved by then.

        Args:
            exit_code: Passed to W&B (non-zero marks the run failed).
        """
        if not self.is_main or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_call(lambda run: run.finish(exit_code=exit_code))
            self._wandb_run = None
        if self.cfg.loss_curve:
            try:
                self.loss_curve_path = write_loss_curve(
                    read_metrics(self.metrics_path), self.run_dir / LOSS_CURVE_FILE, title=self.run_name
                )
            except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
                warnings.warn(f"could not write {LOSS_CURVE_FILE}: {e}", stacklevel=2)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    # ----------------------------------------------------------------------------------------------
    # Start-up

    def _claim_run_id(self) -> tuple[str, int]:
        """Read the run id of an earlier start (and count this restart) or choose a new one."""
        id_path = self.run_dir / RUN_ID_FILE
        restarts_path = self.run_dir / RESTARTS_FILE
        run_id = id_path.read_text(encoding="utf-8").strip() if id_path.exists() else ""
        if run_id:
            previous = restarts_path.read_text(encoding="utf-8").strip() if restarts_path.exists() else ""
            restarts = (int(previous) if previous.isdigit() else 0) + 1
        else:
            # Written before W&B starts: a job killed during wandb.init still continues this id.
            run_id = "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(8))
            _atomic_write_text(id_path, run_id + "\n")
            restarts = 0
        _atomic_write_text(restarts_path, f"{restarts}\n")
        return run_id, restarts

    def _start_wandb(self, config_dict: Mapping[str, Any]) -> Any:
        """wandb.init in the resolved mode; online falls back to offline; None when W&B cannot start."""
        try:
            import wandb
        except ImportError as e:
            warnings.warn(f"W&B disabled: wandb is not importable ({e})", stacklevel=3)
            return None
        identity = {
            k: self._clean_value(v) for k, v in resolve_wandb_identity(self.cfg, self.run_name).items()
        }
        kwargs = dict(
            **identity,
            config=self._clean(config_dict),
            dir=str(self.run_dir),
            id=self.run_id,
            resume="allow",
            job_type="train",
            # Several loggers may live in one process (tests, notebooks): never touch another run.
            reinit="create_new",
        )
        modes = ["online", "offline"] if self.wandb_mode == "online" else [self.wandb_mode]
        for mode in modes:
            try:
                run = wandb.init(mode=mode, **kwargs)
            except Exception as e:  # noqa: BLE001 - an unreachable server must not stop training
                warnings.warn(f"W&B could not start in {mode} mode: {e}", stacklevel=3)
                continue
            self.wandb_mode = mode
            return run
        return None

    def _start_bar(self) -> Any:
        """A tqdm bar on stderr when the config asks for one (auto: stderr is a terminal)."""
        wanted = self.cfg.progress_bar
        isatty = getattr(sys.stderr, "isatty", None)
        if wanted == "never" or (wanted == "auto" and not (isatty and isatty())):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.start_step,  # tqdm's rate (and so the ETA) counts only steps done in this start
            desc=self.run_name,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    # ----------------------------------------------------------------------------------------------
    # Writing

    def _clean(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return scrub({str(k): _plain(v) for k, v in values.items()}, self._env_secrets)

    def _clean_value(self, value: Any) -> Any:
        return scrub(_plain(value), self._env_secrets)

    def _append(self, record: dict[str, Any]) -> None:
        # Opened per record: one write() per line, nothing buffered in this process when it is killed,
        # and truncate_after can replace the file without a stale handle.
        line = json.dumps(record, default=str) + "\n"
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(line)

    def _wandb_log(self, step: int, data: dict[str, Any]) -> None:
        def log(run: Any) -> None:
            # W&B drops (with a warning per call) any step below its current one; skip those quietly.
            if step >= run.step:
                run.log(data, step=step)

        self._wandb_call(log)

    def _wandb_call(self, fn: Any) -> None:
        """Run `fn(run)` on the W&B run; on failure warn once and stop using W&B."""
        if self._wandb_run is None:
            return
        try:
            fn(self._wandb_run)
        except Exception as e:  # noqa: BLE001 - monitoring must not stop training
            warnings.warn(
                f"W&B failed, continuing without it (metrics.jsonl still written): {e}", stacklevel=3
            )
            self._wandb_run = None
            self.wandb_mode = "disabled"

    def _show(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._bar is not None:
            postfix = {}
            if _is_number(metrics.get(TRAIN_LOSS)):
                postfix["loss"] = f"{metrics[TRAIN_LOSS]:.4f}"
            if _is_number(metrics.get("train/tokens_per_s")):
                postfix["tok/s"] = f"{metrics['train/tokens_per_s']:.0f}"
            if _is_number(metrics.get(VAL_LOSS)):
                postfix["val"] = f"{metrics[VAL_LOSS]:.4f}"
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)  # update() moves the rate/ETA estimate
            else:
                self._bar.refresh()
        elif self.echo:
            total = f"/{self.total_steps}" if self.total_steps else ""
            values = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            self._console(f"[{self.run_name}] step {step}{total} {values}")

    def _console(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)  # above the bar, without breaking it
        else:
            print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Helpers


def _plain(value: Any) -> Any:
    """JSON-friendly Python value: tensors/NumPy scalars via .item(), containers recursively."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):  # a tensor with more than one element
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _check_reserved(values: Mapping[str, Any], what: str) -> None:
    clash = _RESERVED.intersection(values)
    if clash:
        raise ValueError(f"{what} name(s) {sorted(clash)} are reserved for metrics.jsonl records")


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _read_summary(path: Path) -> dict[str, Any]:
    """The summary an earlier start saved ({} when there is none or it cannot be read)."""
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: unreadable ({e}); starting a new summary", stacklevel=3)
        return {}
    return summary if isinstance(summary, dict) else {}


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory + fsync + rename: readers see old or new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line without a newline (a process killed mid-write) so the next append starts clean."""
    if not path.exists():
        return
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last complete line; metrics.jsonl can be large.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                break
            end = start
        else:
            f.truncate(0)
    warnings.warn(f"{path}: dropped an incomplete last line (interrupted write)", stacklevel=3)
