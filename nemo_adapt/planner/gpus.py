"""GPU catalog: memory, dense peak throughput and interconnect of the accelerators the planner sizes for.

All figures are per GPU and from NVIDIA's public datasheets (A100, H100, H200, HGX/DGX B200 and
GB200 NVL72). Peak FLOP/s are *dense* (without 2:4 sparsity): the datasheets print sparse figures
with an asterisk, which are twice these. Memory is the capacity CUDA reports (`nvidia-smi`, in GiB),
which is what the allocator can hand out; the marketing "80 GB" of an H100 is 79.6 GiB.
Bandwidths are one direction: NVLink "900 GB/s" (bidirectional) is 450 GB/s each way.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from nemo_adapt.errors import ConfigError

GIB = 1024**3
"""Bytes in a GiB."""


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator type and the node it usually sits in."""

    name: str
    """Catalog key (`h100-80gb`)."""
    description: str
    """Human-readable product name."""
    memory_gib: float
    """Device memory CUDA reports, GiB."""
    bf16_tflops: float
    """Dense BF16 tensor-core peak, TFLOP/s."""
    fp8_tflops: float | None
    """Dense FP8 tensor-core peak, TFLOP/s; None where the GPU has no FP8 tensor cores."""
    tf32_tflops: float
    """Dense TF32 tensor-core peak, TFLOP/s (what `precision: fp32` training runs its GEMMs at)."""
    hbm_tbps: float
    """HBM bandwidth, TB/s (bounds the optimizer step)."""
    nvlink_domain: int
    """GPUs connected all-to-all by NVLink/NVSwitch (8 in a DGX/HGX node, 72 in a GB200 NVL72 rack)."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU, one direction, GB/s."""
    internode_gbps: float
    """Scale-out network bandwidth per GPU (InfiniBand/RoCE NIC per GPU), one direction, GB/s."""
    nvlink_spans_nodes: bool = False
    """True when the NVLink domain spans several nodes (GB200 NVL72: 18 trays of 4 GPUs)."""

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes."""
        return self.memory_gib * GIB

    def peak_tflops(self, precision: str) -> float:
        """Dense tensor-core peak for a training precision.

        Args:
            precision: `bf16`, `fp8` or `fp32` (fp32 training runs GEMMs in TF32).

        Returns:
            TFLOP/s.

        Raises:
            ConfigError: FP8 on a GPU without FP8 tensor cores, or an unknown precision.
        """
        if precision == "bf16":
            return self.bf16_tflops
        if precision == "fp32":
            return self.tf32_tflops
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ConfigError(
                    f"precision=fp8 needs FP8 tensor cores (Hopper or newer); {self.name} has none. "
                    "Use precision=bf16 or an h100/h200/b200/gb200 GPU."
                )
            return self.fp8_tflops
        raise ConfigError(f"precision={precision!r} is not supported; allowed: bf16, fp8, fp32")

    def nvlink_domain_size(self, gpus_per_node: int) -> int:
        """GPUs that can talk over NVLink, given the node size.

        Within a node this is the node (capped by the NVSwitch domain); GB200 NVL72 links 72 GPUs across
        18 four-GPU trays, so its domain is larger than a node.
        """
        if self.nvlink_spans_nodes:
            return self.nvlink_domain
        return min(gpus_per_node, self.nvlink_domain)


# NDR InfiniBand / ConnectX-7: one 400 Gb/s NIC per GPU = 50 GB/s; HDR (A100 DGX): 200 Gb/s = 25 GB/s.
_CATALOG: dict[str, GPUSpec] = {
    spec.name: spec
    for spec in (
        GPUSpec("a100-40gb", "NVIDIA A100 SXM4 40GB", memory_gib=40.0, bf16_tflops=312.0, fp8_tflops=None,
                tf32_tflops=156.0, hbm_tbps=1.555, nvlink_domain=8, nvlink_gbps=300.0, internode_gbps=25.0),
        GPUSpec("a100-80gb", "NVIDIA A100 SXM4 80GB", memory_gib=80.0, bf16_tflops=312.0, fp8_tflops=None,
                tf32_tflops=156.0, hbm_tbps=2.039, nvlink_domain=8, nvlink_gbps=300.0, internode_gbps=25.0),
        # 81,559 MiB reported.
        GPUSpec("h100-80gb", "NVIDIA H100 SXM5 80GB", memory_gib=79.6, bf16_tflops=989.0, fp8_tflops=1979.0,
                tf32_tflops=494.7, hbm_tbps=3.35, nvlink_domain=8, nvlink_gbps=450.0, internode_gbps=50.0),
        # 143,771 MiB reported; same compute as H100 SXM.
        GPUSpec("h200-141gb", "NVIDIA H200 SXM 141GB", memory_gib=140.4, bf16_tflops=989.0, fp8_tflops=1979.0,
                tf32_tflops=494.7, hbm_tbps=4.8, nvlink_domain=8, nvlink_gbps=450.0, internode_gbps=50.0),
        # 183,359 MiB reported (DGX B200 lists 1,440 GB for 8 GPUs).
        GPUSpec("b200", "NVIDIA B200 (HGX/DGX B200) 180GB", memory_gib=179.0, bf16_tflops=2250.0,
                fp8_tflops=4500.0, tf32_tflops=1100.0, hbm_tbps=8.0, nvlink_domain=8, nvlink_gbps=900.0,
                internode_gbps=50.0),
        # GB200 NVL72: 13.4 TB HBM3e / 72 GPUs = 186 GB each; dense = half the sparse datasheet figures.
        GPUSpec("gb200", "NVIDIA GB200 NVL72 (per Blackwell GPU) 186GB", memory_gib=184.0, bf16_tflops=2500.0,
                fp8_tflops=5000.0, tf32_tflops=1250.0, hbm_tbps=8.0, nvlink_domain=72, nvlink_gbps=900.0,
                internode_gbps=50.0, nvlink_spans_nodes=True),
    )
}

# Shorthands people type; each maps to exactly one catalog entry.
_ALIASES = {
    "a100-40g": "a100-40gb", "a100_40gb": "a100-40gb",
    "a100-80g": "a100-80gb", "a100_80gb": "a100-80gb",
    "h100": "h100-80gb", "h100-80g": "h100-80gb", "h100_80gb": "h100-80gb", "h100-sxm": "h100-80gb",
    "h200": "h200-141gb", "h200-141g": "h200-141gb", "h200_141gb": "h200-141gb",
    "b200-180gb": "b200", "gb200-nvl72": "gb200",
}


def list_gpus() -> dict[str, GPUSpec]:
    """All catalog entries by name."""
    return dict(_CATALOG)


def get_gpu(name: str) -> GPUSpec:
    """Look a GPU type up by catalog name or a common shorthand (case-insensitive).

    Args:
        name: `h100-80gb`, `h100`, `H200`, ...

    Returns:
        The catalog entry.

    Raises:
        ConfigError: unknown type; the message suggests the closest names and lists the catalog.
    """
    key = name.strip().lower().replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key in _CATALOG:
        return _CATALOG[key]
    # A prefix such as "a100" is ambiguous between memory sizes: suggest every entry it starts.
    close = [n for n in sorted(_CATALOG) if n.startswith(key)]
    if not close:
        known = sorted(_CATALOG) + sorted(_ALIASES)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        close = list(dict.fromkeys(_ALIASES.get(c, c) for c in close))
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown GPU type {name!r} (--gpu / cluster.gpu).{hint} Known: {', '.join(sorted(_CATALOG))}")
