"""Run monitoring: metrics.jsonl, Weights & Biases, a progress bar, loss_curve.png, secret scrubbing.

`RunLogger` is what the training loop uses; `read_offline_run` reads an offline W&B run back from disk.
"""

from nemo_adapt.logging.loss_curve import write_loss_curve
from nemo_adapt.logging.run_logger import (
    RunLogger,
    read_metrics,
    resolve_wandb_identity,
    resolve_wandb_mode,
    truncate_metrics,
)
from nemo_adapt.logging.scrub import REDACTED, is_secret_key, scrub
from nemo_adapt.logging.wandb_offline import OfflineRun, read_offline_run

__all__ = [
    "REDACTED",
    "OfflineRun",
    "RunLogger",
    "is_secret_key",
    "read_metrics",
    "read_offline_run",
    "resolve_wandb_identity",
    "resolve_wandb_mode",
    "scrub",
    "truncate_metrics",
    "write_loss_curve",
]
