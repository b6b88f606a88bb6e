"""An adapter as a merge parent: its base model with the adapter's update folded in, one tensor at a time.

`nemo-adapt merge` streams parents tensor by tensor; an adapter (ours or Hugging Face PEFT) takes part as
the model it makes of its base, W' = fold(W), so every merge method sees a whole model and the methods on
task vectors see the adapter's delta W' - W. The fold is computed per tensor in float32 from the adapter's
Hugging Face PEFT form (each method's `to_hf_peft`), as HF PEFT's `merge_and_unload` computes it:

    LoRA   W' = W + s B A                                 s = lora_alpha / r
    DoRA   W' = m / ||W + s B A||_c * (W + s B A)          norm per output row; the bias unchanged
    IA3    W' = W * l  (l [out, 1] scales rows, bias too;  l [1, in] of a feed-forward module scales columns)

Only the adapter's tensors and one base tensor at a time are in memory. The base is the one the adapter was
trained on (fingerprints compared); a merge's parents must share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from nemo_adapt.errors import ConfigError

PREFIX = "base_model.model."
"""Where HF PEFT's tensor names put the base model's own module names (`model.layers.<i>.self_attn.q_proj`)."""


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a merge parent names an adapter directory (it has adapter_config.json) rather than a checkpoint."""
    return (Path(path) / "adapter_config.json").is_file()


class AdapterParent:
    """A merge parent made of a base checkpoint and an adapter: the `tensors(name)` of the folded model.

    Args:
        path: the adapter directory (ours or Hugging Face PEFT).
        base: the base checkpoint to fold into (default: the one the adapter names); it must be the one the
            adapter was trained on when the adapter records that.

    Raises:
        CheckpointError: not an adapter, or another base than the adapter's.
        ConfigError: a method that does not fold into weights (prompt, prefix tuning, Houlsby adapters).
    """

    def __init__(self, path: str | Path, base: str | None = None):
        from nemo_adapt.artifacts.adapter import WEIGHTS, load_adapter, open_adapter, open_adapter_base
        from nemo_adapt.models.loader import base_fingerprint
        from nemo_adapt.peft.base import get_peft_method

        files = open_adapter(path)
        method = get_peft_method(files.method)
        try:
            method.check_mergeable()
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        self.source = open_adapter_base(files, base)
        adapter = load_adapter(files, self.source)
        self.fields, tensors = method.to_hf_peft(adapter.config, adapter.tensors, self.source.spec)
        self.hf = {k[len(PREFIX):]: v.float() for k, v in tensors.items()}
        self.spec = self.source.spec
        from nemo_adapt.models.weights import hf_shapes

        self.shapes = hf_shapes(self.spec)
        self.tokenizer_path = self.source.tokenizer_path
        self.location = str(path)
        self.base_fingerprint = base_fingerprint(self.source)
        digest = hashlib.sha256((files.path / WEIGHTS).read_bytes()).hexdigest()
        self.lineage = {"adapter": str(path), "format": files.format, "method": files.method,
                        "base_model": self.source.location, "base_model_fingerprint": self.base_fingerprint,
                        "sha256": digest}

    def base_model_fingerprint_text(self) -> str:
        """The base this adapter folds into, for messages."""
        return f"{self.source.location} = {self.base_fingerprint}"

    def tensors(self, name: str) -> torch.Tensor:
        """The folded model's tensor `name` (Hugging Face name), float32."""
        return self.rows(name, 0, self.shapes[name][0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the folded model's tensor `name`, float32 (every fold acts on whole rows:
        LoRA's B A and DoRA's norms are per output row; IA3 scales rows, or every row's columns)."""
        from nemo_adapt.merge.cli import read_rows

        w = read_rows(self.source, name, start, stop)
        module, _, leaf = name.rpartition(".")
        f = self.fields
        if f["peft_type"] == "LORA" and leaf == "weight" and f"{module}.lora_A.weight" in self.hf:
            b = self.hf[f"{module}.lora_B.weight"][start:stop]
            v = w + (f["lora_alpha"] / f["r"]) * (b @ self.hf[f"{module}.lora_A.weight"])
            if f.get("use_dora"):
                m = self.hf[f"{module}.lora_magnitude_vector"][start:stop]
                v = (m / v.norm(p=2, dim=1))[:, None] * v
            return v
        if f["peft_type"] == "IA3" and f"{module}.ia3_l" in self.hf:
            scale = self.hf[f"{module}.ia3_l"]
            if leaf == "weight":
                return w * (scale[start:stop] if scale.shape[1] == 1 else scale)  # [out, 1] rows, [1, in] columns
            if leaf == "bias" and scale.shape[1] == 1:
                return w * scale[start:stop, 0]  # an output scale applies to the bias too
        return w
