"""RunLogger: metrics.jsonl, offline W&B runs read back from disk, resume, truncation, the loss plot.

Every test runs W&B offline or disabled (WANDB_API_KEY unset, WANDB_MODE=offline): nothing here
touches the network. W&B's system-metrics sampler is switched off too (it probes cloud metadata
endpoints and adds seconds per run).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from nemo_adapt.config.schema import LoggingConfig
from nemo_adapt.logging import (
    REDACTED,
    RunLogger,
    read_metrics,
    read_offline_run,
    resolve_wandb_identity,
    resolve_wandb_mode,
    truncate_metrics,
)
from nemo_adapt.logging.loss_curve import loss_points

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean, offline, quiet W&B environment whose own files all land under tmp_path."""
    for name in list(os.environ):
        if name.startswith("WANDB"):
            monkeypatch.delenv(name)
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB__DISABLE_META", "true")
    return tmp_path


def train_metrics(step: int) -> dict[str, float | int]:
    return {
        "train/loss": 3.0 / step,
        "train/lr": 1e-4 * step,
        "train/grad_norm": 0.5 + step / 7,
        "train/tokens_per_s": 1000.0 + step,
        "train/step_time_s": 0.25,
        "train/trainable_params": 12345,
        "train/peak_memory_gib": 1.5,
    }


def by_step(rows: list[dict], step_key: str) -> dict[int, dict]:
    """Merge rows per step, later rows winning (what a resumed run ends up showing)."""
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row[step_key], {}).update(row)
    return merged


def assert_wandb_matches_metrics(run_dir: Path, run_id: str) -> None:
    """Every metric value in metrics.jsonl is in the W&B history at the same step, equal."""
    wandb_rows = by_step(read_offline_run(run_dir, run_id).history, "_step")
    metric_rows = by_step([r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r], "step")
    assert metric_rows, "metrics.jsonl is empty"
    for step, record in metric_rows.items():
        expected = {k: v for k, v in record.items() if k not in ("step", "time")}
        got = {k: wandb_rows[step][k] for k in expected}
        assert got == expected, f"step {step}"


# --------------------------------------------------------------------------------------------------
# W&B offline, read back from the .wandb file


def test_offline_run_reads_back_metrics_config_and_summary(wandb_env, monkeypatch):
    run_dir = wandb_env / "run"
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    monkeypatch.setenv("WANDB_TAGS", "slurm, nightly ,recipe")
    monkeypatch.setenv("HF_TOKEN", "hf_EnvSecretValue123")
    cfg = LoggingConfig(wandb_project="recipe-project", wandb_tags=["recipe"], progress_bar="never")
    config = {
        "run": {"name": "demo", "seed": 1},
        "optim": {"lr": 1e-4},
        "data": {"max_new_tokens": 32, "hub_token": "hf_ConfigSecretValue"},
        "paths": ["/data/train.jsonl", "s3://bucket?auth=hf_EnvSecretValue123"],
    }

    logger = RunLogger(cfg, run_dir=run_dir, run_name="demo", config_dict=config, total_steps=4)
    assert logger.wandb_mode == "offline" and logger.restarts == 0
    for step in (1, 2, 3, 4):
        logger.log(step, train_metrics(step))
        if step % 2 == 0:
            logger.log(step, {"val/loss": 2.0 / step})
    logger.event("checkpoint_saved", step=4, path="ckpt/step_4", api_key="sk-EventSecretValue")
    logger.update_summary({"eval/exact_match": 0.8, "eval/baseline_exact_match": 0.1})
    logger.close()

    run = read_offline_run(run_dir)
    assert run.run_id == logger.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert (run.project, run.name, run.group) == ("env-project", "demo", "sweep-7")
    assert run.tags == ["recipe", "slurm", "nightly"]
    assert run.config["run"] == {"name": "demo", "seed": 1}
    assert run.config["optim"] == {"lr": 1e-4}
    assert run.config["data"] == {"max_new_tokens": 32, "hub_token": REDACTED}
    assert run.config["paths"] == ["/data/train.jsonl", f"s3://bucket?auth={REDACTED}"]

    assert_wandb_matches_metrics(run_dir, run.run_id)
    history = by_step(run.history, "_step")
    assert history[4]["train/loss"] == 0.75 and history[4]["val/loss"] == 0.5
    assert (
        history[4]["event/checkpoint_saved"] == f"checkpoint_saved step=4 path=ckpt/step_4 api_key={REDACTED}"
    )
    assert run.summary["eval/exact_match"] == 0.8
    assert run.summary["eval/baseline_exact_match"] == 0.1
    assert run.summary["run/restarts"] == 0
    assert run.summary["event/checkpoint_saved"] == history[4]["event/checkpoint_saved"]

    # No secret anywhere in what the run left behind: metrics, summary, W&B's binary log and its own logs.
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for secret in (b"hf_EnvSecretValue123", b"hf_ConfigSecretValue", b"sk-EventSecretValue"):
                assert secret not in data, f"{secret!r} leaked into {path}"
    assert json.loads((run_dir / "run_summary.json").read_text())["eval/exact_match"] == 0.8
    assert (run_dir / "loss_curve.png").read_bytes().startswith(PNG_SIGNATURE)


def test_resume_continues_the_same_wandb_run(wandb_env):
    run_dir = wandb_env / "run"
    cfg = LoggingConfig(progress_bar="never")

    # First attempt: checkpoint at step 2, logs step 3, then "crashes" (closed without finishing cleanly).
    first = RunLogger(cfg, run_dir=run_dir, run_name="r", config_dict={"seed": 1}, total_steps=5)
    for step in (1, 2, 3):
        first.log(step, {"train/loss": 10.0 + step})
    first.close(exit_code=1)
    assert (run_dir / "restarts").read_text().strip() == "0"

    # Second attempt on the same run directory resumes from the step-2 checkpoint.
    second = RunLogger(
        cfg, run_dir=run_dir, run_name="r", config_dict={"seed": 1}, total_steps=5, start_step=2
    )
    assert second.run_id == first.run_id
    assert second.restarts == 1 and (run_dir / "restarts").read_text().strip() == "1"
    assert second.truncate_after(2) == 1  # the crashed attempt's step 3
    second.event("resumed", step=2, restarts=second.restarts)
    for step in (3, 4, 5):
        second.log(step, {"train/loss": 20.0 + step})
    second.close()

    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r.get("train/loss", r.get("run/restarts", r.get("event")))) for r in records] == [
        (0, 0),
        (1, 11.0),
        (2, 12.0),
        (2, 1),
        (2, "resumed"),
        (3, 23.0),
        (4, 24.0),
        (5, 25.0),
    ]
    run = read_offline_run(run_dir)
    assert run.run_id == first.run_id
    assert len(run.files) == 2  # one .wandb file per start, both the same run id
    assert run.summary["run/restarts"] == 1
    assert_wandb_matches_metrics(run_dir, run.run_id)
    steps = [row["_step"] for row in run.history if "train/loss" in row]
    assert steps == [1, 2, 3, 3, 4, 5]  # W&B keeps the crashed attempt's step 3; the later one wins
    assert by_step(run.history, "_step")[2]["event/resumed"] == "resumed step=2 restarts=1"


# --------------------------------------------------------------------------------------------------
# Without W&B


def test_disabled_mode_writes_metrics_and_counts_restarts(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    run_dir = wandb_env / "run"
    cfg = LoggingConfig(wandb_mode="disabled", progress_bar="never")
    with RunLogger(cfg, run_dir=run_dir, run_name="quiet", total_steps=3) as logger:
        assert logger.wandb_mode == "disabled"
        logger.log(1, {"train/loss": 2.0, "train/tokens_per_s": 100.0})
        logger.log(1, {"val/loss": 1.5})
        logger.event("note", step=1, password="hunter2hunter2", detail={"db_password": "x", "n": 3})
    assert not (run_dir / "wandb").exists()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[0]["run/restarts"] == 0
    assert {k: v for k, v in records[1].items() if k != "time"} == {
        "step": 1,
        "train/loss": 2.0,
        "train/tokens_per_s": 100.0,
    }
    assert records[2]["val/loss"] == 1.5 and isinstance(records[2]["time"], float)
    assert records[3] == {
        "step": 1,
        "time": records[3]["time"],
        "event": "note",
        "password": REDACTED,
        "detail": {"db_password": REDACTED, "n": 3},
    }
    assert (run_dir / "loss_curve.png").exists()

    again = RunLogger(cfg, run_dir=run_dir, run_name="quiet", start_step=1)
    again.close()
    assert again.restarts == 1 and again.run_id == logger.run_id


def test_wandb_that_cannot_start_falls_back_then_disables(wandb_env, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE")
    tried: list[str] = []

    def failing_init(mode: str, **kwargs):
        tried.append(mode)
        raise RuntimeError("no server")

    monkeypatch.setattr(wandb, "init", failing_init)
    cfg = LoggingConfig(wandb_mode="online", progress_bar="never", loss_curve=False)
    with pytest.warns(UserWarning, match="W&B could not start"):
        logger = RunLogger(cfg, run_dir=wandb_env / "run", run_name="r")
    assert tried == ["online", "offline"] and logger.wandb_mode == "disabled"
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert read_metrics(wandb_env / "run" / "metrics.jsonl")[-1]["train/loss"] == 1.0


def test_non_main_rank_is_a_no_op(tmp_path):
    logger = RunLogger(LoggingConfig(), run_dir=tmp_path / "run", run_name="r", is_main=False, total_steps=3)
    logger.log(1, {"train/loss": 1.0})
    logger.event("resumed", step=1)
    logger.update_summary({"eval/exact_match": 1.0})
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not (tmp_path / "run").exists()
    assert logger.run_id is None and logger.restarts == 0


def test_reserved_metric_names_are_refused(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    cfg = LoggingConfig(wandb_mode="disabled", progress_bar="never", loss_curve=False)
    with RunLogger(cfg, run_dir=wandb_env / "run", run_name="r") as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3})
        with pytest.raises(ValueError, match="reserved"):
            logger.event("x", time=1.0)


# --------------------------------------------------------------------------------------------------
# metrics.jsonl truncation and repair


def test_truncate_after_keeps_earlier_steps_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "time": 0.0, "train/loss": float(s)}) for s in (1, 2, 3, 4)]
    lines.insert(2, json.dumps({"step": 2, "event": "checkpoint_saved"}))
    path.write_text("\n".join(lines) + '\n{"step": 5, "tim')  # torn last line of a killed process
    assert truncate_metrics(path, 2) == 3  # steps 3, 4 and the torn line
    assert [(r["step"], r.get("event")) for r in read_metrics(path)] == [
        (1, None),
        (2, None),
        (2, "checkpoint_saved"),
    ]
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    assert truncate_metrics(tmp_path / "missing.jsonl", 1) == 0


def test_torn_last_line_is_cut_before_appending(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
    cfg = LoggingConfig(wandb_mode="disabled", progress_bar="never", loss_curve=False)
    with pytest.warns(UserWarning, match="incomplete last line"):
        logger = RunLogger(cfg, run_dir=run_dir, run_name="r", start_step=1)
    logger.log(2, {"train/loss": 0.5})
    logger.close()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 1, 2]


# --------------------------------------------------------------------------------------------------
# Mode and identity resolution


@pytest.mark.parametrize(
    ("config_mode", "env", "expected"),
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "k" * 40}, "online"),
        ("online", {}, "online"),
        ("offline", {"WANDB_API_KEY": "k" * 40}, "offline"),
        ("disabled", {"WANDB_API_KEY": "k" * 40}, "disabled"),
        ("online", {"WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("offline", {"WANDB_MODE": "disabled"}, "disabled"),
        ("online", {"WANDB_DISABLED": "true"}, "disabled"),
    ],
)
def test_wandb_mode_resolution(config_mode, env, expected):
    assert resolve_wandb_mode(config_mode, env) == expected


def test_wandb_identity_env_overrides():
    cfg = LoggingConfig(
        wandb_project="p", wandb_entity="team", wandb_name=None, wandb_group="g", wandb_tags=["a", "b"]
    )
    assert resolve_wandb_identity(cfg, "run-name", {}) == {
        "project": "p",
        "entity": "team",
        "name": "run-name",
        "group": "g",
        "tags": ["a", "b"],
    }
    env = {
        "WANDB_PROJECT": "P2",
        "WANDB_ENTITY": "E2",
        "WANDB_NAME": "N2",
        "WANDB_RUN_GROUP": "G2",
        "WANDB_TAGS": "b, c,,d",
    }
    assert resolve_wandb_identity(cfg, "run-name", env) == {
        "project": "P2",
        "entity": "E2",
        "name": "N2",
        "group": "G2",
        "tags": ["a", "b", "c", "d"],
    }
    assert resolve_wandb_identity(LoggingConfig(wandb_name="explicit"), "run-name", {})["name"] == "explicit"


# --------------------------------------------------------------------------------------------------
# Progress bar and loss curve


def test_progress_bar_shows_step_total_loss_and_throughput(wandb_env, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    cfg = LoggingConfig(wandb_mode="disabled", progress_bar="always", loss_curve=False)
    with RunLogger(cfg, run_dir=wandb_env / "run", run_name="bar", total_steps=10, start_step=2) as logger:
        logger.log(3, {"train/loss": 1.23456, "train/tokens_per_s": 4321.0})
        logger.event("resumed", step=3, restarts=0)
    err = capsys.readouterr().err
    assert "3/10" in err and "loss=1.2346" in err and "tok/s=4321" in err
    assert "event resumed step=3 restarts=0" in err

    # auto: stderr is captured by pytest, not a terminal, so no bar, one plain line per log call.
    auto = LoggingConfig(wandb_mode="disabled", progress_bar="auto", loss_curve=False)
    with RunLogger(auto, run_dir=wandb_env / "run2", run_name="plain", total_steps=10) as logger:
        assert logger._bar is None
        logger.log(1, {"train/loss": 2.0})
    assert "[plain] step 1/10 train/loss=2" in capsys.readouterr().err


def test_loss_curve_is_a_valid_png_and_skipped_without_points(wandb_env, monkeypatch):
    from matplotlib.image import imread

    monkeypatch.delenv("WANDB_MODE")
    cfg = LoggingConfig(wandb_mode="disabled", progress_bar="never")
    with RunLogger(cfg, run_dir=wandb_env / "run", run_name="curve", echo=False) as logger:
        for step in range(1, 11):
            logger.log(step, {"train/loss": 3.0 - step * 0.2})
            if step % 5 == 0:
                logger.log(step, {"val/loss": 2.9 - step * 0.15})
    png = wandb_env / "run" / "loss_curve.png"
    assert logger.loss_curve_path == png
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (700, 450)
    assert imread(png).shape[:2] == (450, 700)  # decodes

    with RunLogger(cfg, run_dir=wandb_env / "empty", run_name="empty", echo=False) as logger:
        logger.log(1, {"train/lr": 1e-4})  # no loss point: no plot, no error
    assert logger.loss_curve_path is None and not (wandb_env / "empty" / "loss_curve.png").exists()


def test_loss_points_last_record_per_step_wins():
    records = [
        {"step": 2, "train/loss": 5.0},
        {"step": 1, "train/loss": 4.0},
        {"step": 2, "train/loss": 3.0},
        {"step": 3, "train/loss": float("nan")},
        {"step": 4, "val/loss": 1.0},
        {"step": 5, "train/loss": "x"},
    ]
    assert loss_points(records, "train/loss") == ([1, 2], [4.0, 3.0])
    assert loss_points(records, "val/loss") == ([4], [1.0])
