"""Map weights between Hugging Face layout (one tensor per projection) and Megatron-Core's
fused, tensor-parallel-sharded layout, for any TP/PP.

Megatron-Core layout, per layer (d = head dim, g = KV groups, q/g = query heads per group):

* `linear_qkv.weight` [g * (q/g + 2) * d, h]: for each KV group, its query heads, then its key
  head, then its value head. Column-parallel: TP rank r holds groups r*g/t .. (r+1)*g/t - 1.
* `linear_fc1.weight` [2 * ffn, h]: gate rows then up rows. Column-parallel with the fusion done
  per shard: TP rank r holds [gate shard r; up shard r].
* `linear_proj.weight`, `linear_fc2.weight`: row-parallel, split along the input dimension.
* embedding and output layer: vocabulary-parallel, split along (padded) vocabulary rows.
* norms: replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.builder import padded_vocab_size
from nemo_adapt.models.spec import ModelSpec

TensorSource = Callable[[str], torch.Tensor]
"""Returns the full Hugging Face-named tensor for a name; raises CheckpointError if missing."""


def hf_tensor_names(spec: ModelSpec) -> list[str]:
    """Every tensor name a Hugging Face checkpoint of `spec` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if spec.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Expected shape of every Hugging Face tensor of `spec`."""
    h, d, f, v = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size, spec.vocab_size
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {}
    for name in hf_tensor_names(spec):
        leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else name
        bias = name.endswith(".bias")
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shapes[name] = (v, h)
        elif "norm" in leaf:
            shapes[name] = (h,)
        elif leaf == "q_proj":
            shapes[name] = (q,) if bias else (q, h)
        elif leaf in ("k_proj", "v_proj"):
            shapes[name] = (kv,) if bias else (kv, h)
        elif leaf == "o_proj":
            shapes[name] = (h, q)
        elif leaf in ("gate_proj", "up_proj"):
            shapes[name] = (f, h)
        elif leaf == "down_proj":
            shapes[name] = (h, f)
    return shapes


def _fuse_qkv(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g, d = spec.num_query_groups, spec.kv_channels
    per_group = spec.num_attention_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, per_group * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(g * (per_group + 2) * d, *tail)


def _split_qkv(spec: ModelSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = spec.num_query_groups, spec.kv_channels
    per_group = spec.num_attention_heads // g
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail))


def _pad_vocab(spec: ModelSpec, w: torch.Tensor, tp: int) -> torch.Tensor:
    rows = padded_vocab_size(spec.vocab_size, tp)
    if rows == w.shape[0]:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def _layer_of(local_name: str, layer_numbers: dict[int, int]) -> tuple[int, str]:
    # "decoder.layers.3.self_attention..." -> (global layer, "self_attention...")
    parts = local_name.split(".")
    local = int(parts[2])
    return layer_numbers[local], ".".join(parts[3:])


def _layer_numbers(model) -> dict[int, int]:
    # TransformerLayer.layer_number is the 1-based global index, whatever the PP/VP stage.
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def _hf_full_for(spec: ModelSpec, local_name: str, layer_numbers: dict[int, int], src: TensorSource,
                 tp: int, tp_rank: int) -> torch.Tensor:
    """The tensor this TP rank should hold for Megatron parameter `local_name`."""
    if local_name == "embedding.word_embeddings.weight":
        return _pad_vocab(spec, src("model.embed_tokens.weight"), tp).chunk(tp)[tp_rank]
    if local_name == "output_layer.weight":
        hf = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        return _pad_vocab(spec, src(hf), tp).chunk(tp)[tp_rank]
    if local_name == "decoder.final_layernorm.weight":
        return src("model.norm.weight")
    if not local_name.startswith("decoder.layers."):
        raise CheckpointError(f"no Hugging Face source for Megatron parameter {local_name!r}")
    layer, rest = _layer_of(local_name, layer_numbers)
    p = f"model.layers.{layer}."
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return src(p + "input_layernorm.weight")
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return src(p + "post_attention_layernorm.weight")
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        fused = _fuse_qkv(spec, *(src(p + f"self_attn.{x}_proj.{kind}") for x in "qkv"))
        return fused.chunk(tp)[tp_rank]
    if rest == "self_attention.linear_proj.weight":
        return src(p + "self_attn.o_proj.weight").chunk(tp, dim=1)[tp_rank]
    if rest == "mlp.linear_fc1.weight":
        gate = src(p + "mlp.gate_proj.weight").chunk(tp)[tp_rank]
        up = src(p + "mlp.up_proj.weight").chunk(tp)[tp_rank]
        return torch.cat([gate, up])
    if rest == "mlp.linear_fc2.weight":
        return src(p + "mlp.down_proj.weight").chunk(tp, dim=1)[tp_rank]
    raise CheckpointError(f"no Hugging Face source for Megatron parameter {local_name!r}")


def base_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's own (non-adapter) parameters, under the names of the unadapted model.

    PEFT transforms mark the parameters they add with `is_adapter = True` and keep a wrapped
    module under `base_layer`; both are undone here so weight maps see the plain base model.
    """
    for name, p in model.named_parameters():
        if not getattr(p, "is_adapter", False):
            yield name.replace(".base_layer.", "."), p


def load_hf_into_megatron(model, spec: ModelSpec, src: TensorSource, tp: int = 1, tp_rank: int = 0) -> int:
    """Copy Hugging Face-named weights into this rank's Megatron stage, in place.

    Args:
        model: a `GPTModel` stage built by `build_model` for `spec`.
        spec: the architecture.
        src: full HF-named tensors (see `hf.open_checkpoint`, `gguf_io.open_gguf`).
        tp, tp_rank: tensor-parallel size and rank of this process.

    Returns:
        The number of parameters loaded.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape (names the tensor and both shapes).
    """
    layer_numbers = _layer_numbers(model)
    loaded = 0
    with torch.no_grad():
        for name, param in base_parameters(model):
            value = _hf_full_for(spec, name, layer_numbers, src, tp, tp_rank)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"tensor for Megatron parameter {name!r} has shape {tuple(value.shape)} after TP "
                    f"sharding, model expects {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
            loaded += 1
    return loaded


def _gather_tp(t: torch.Tensor, dim: int, tp_group, tp: int) -> torch.Tensor:
    if tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


def megatron_to_hf(model, spec: ModelSpec, tp: int = 1, tp_group=None) -> dict[str, torch.Tensor]:
    """Full Hugging Face-named tensors for the layers of this stage (gathers over the TP group).

    Every TP rank of the stage gets the same result; callers usually write from TP rank 0 only.
    """
    layer_numbers = _layer_numbers(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in base_parameters(model):
        w = param.detach()
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = _gather_tp(w, 0, tp_group, tp)[: spec.vocab_size]
            continue
        if name == "output_layer.weight":
            if not spec.tie_word_embeddings:
                out["lm_head.weight"] = _gather_tp(w, 0, tp_group, tp)[: spec.vocab_size]
            continue
        if name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = w.clone()
            continue
        layer, rest = _layer_of(name, layer_numbers)
        p = f"model.layers.{layer}."
        if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
            out[p + "input_layernorm.weight"] = w.clone()
        elif rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
            out[p + "post_attention_layernorm.weight"] = w.clone()
        elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = _split_qkv(spec, _gather_tp(w, 0, tp_group, tp))
            for x, t in zip("qkv", (q, k, v)):
                out[p + f"self_attn.{x}_proj.{kind}"] = t.contiguous()
        elif rest == "self_attention.linear_proj.weight":
            out[p + "self_attn.o_proj.weight"] = _gather_tp(w, 1, tp_group, tp)
        elif rest == "mlp.linear_fc1.weight":
            gate, up = w.chunk(2)
            out[p + "mlp.gate_proj.weight"] = _gather_tp(gate.contiguous(), 0, tp_group, tp)
            out[p + "mlp.up_proj.weight"] = _gather_tp(up.contiguous(), 0, tp_group, tp)
        elif rest == "mlp.linear_fc2.weight":
            out[p + "mlp.down_proj.weight"] = _gather_tp(w, 1, tp_group, tp)
        else:
            raise CheckpointError(f"no Hugging Face name for Megatron parameter {name!r}")
    return out
