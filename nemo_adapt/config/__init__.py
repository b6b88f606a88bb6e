"""Recipe configuration: the typed schema, YAML loading with `key=value` overrides, the resolved copy.

    from nemo_adapt.config import load_recipe, save_resolved, resolve_run_dir
    cfg = load_recipe("recipes/smollm2_135m_lora.yaml", ["train.micro_batch_size=2"])
    save_resolved(cfg, resolve_run_dir(cfg) / "config.yaml")

Names are imported on first use: the schema pulls in the PEFT registry and with it torch, which
`nemo-adapt --help` (importing `nemo_adapt.config.cli`) should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_adapt.config.loader import (
        config_to_dict,
        dump_resolved,
        escape_literals,
        load_recipe,
        load_resolved,
        resolve_run_dir,
        save_resolved,
    )
    from nemo_adapt.config.schema import (
        CheckpointConfig,
        ClusterConfig,
        DataConfig,
        EvalConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        RecipeConfig,
        RunConfig,
        TrainConfig,
    )
    from nemo_adapt.errors import ConfigError
    from nemo_adapt.peft.base import PeftConfig

__all__ = [
    "CheckpointConfig", "ClusterConfig", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "PeftConfig", "RecipeConfig", "RunConfig", "TrainConfig",
    "config_to_dict", "dump_resolved", "escape_literals", "load_recipe", "load_resolved", "resolve_run_dir",
    "save_resolved",
]

# Public name -> module defining it.
_WHERE = {
    **{name: "nemo_adapt.config.schema" for name in __all__ if name.endswith("Config") and name != "PeftConfig"},
    **{name: "nemo_adapt.config.loader" for name in __all__ if name[0].islower()},
    "ConfigError": "nemo_adapt.errors",
    "PeftConfig": "nemo_adapt.peft.base",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
