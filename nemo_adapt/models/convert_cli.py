"""`nemo-adapt export`: convert a checkpoint (GGUF, HF directory, embedded) to a Hugging Face
directory that `transformers` and serving tools load. Run under torchrun to export from a TP/PP
layout; the files do not depend on TP.

With `--adapter DIR` (ours or Hugging Face PEFT): `--format peft` writes the adapter as an HF PEFT
adapter; the default `--format hf` writes a merged model, the adapter folded into the base weights
(LoRA, DoRA, IA3) in float32 on each rank's shards, then cast to `--dtype`."""

from __future__ import annotations

import argparse

from nemo_adapt.models.embedded import EMBEDDED_NAME


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", help="destination directory (replaced atomically if it exists)")
    p.add_argument("--checkpoint", default=None,
                   help=f"HF directory, .gguf file or embedded name (default: the adapter's base, else {EMBEDDED_NAME})")
    p.add_argument("--model", default=None, help="registered architecture to check the checkpoint against")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--pipeline-parallel", type=int, default=1)
    p.add_argument("--adapter", help="an adapter directory (nemo-adapt artifact or Hugging Face PEFT): merged into "
                   "the base (--format hf) or written as an HF PEFT adapter (--format peft)")
    p.add_argument("--format", choices=["hf", "peft"], default="hf",
                   help="hf: a Hugging Face model directory (with --adapter: merged); peft: a Hugging Face PEFT "
                   "adapter (needs --adapter)")
    p.add_argument("--base", help="with --format peft: the base checkpoint (default: the one the adapter names)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nemo_adapt.models.hf import check_replaceable

    check_replaceable(args.output)  # before any work: the output replaces the directory whole
    from nemo_adapt.errors import ConfigError

    if args.format == "peft":
        if not args.adapter:
            raise ConfigError("--format peft exports an adapter: pass --adapter ADAPTER_DIR")
        from nemo_adapt.artifacts.hf_peft import export_peft

        out = export_peft(args.adapter, args.output, args.base or args.checkpoint)
        print(f"exported {args.adapter} as a Hugging Face PEFT adapter to {out}")
        return 0
    if args.base and args.checkpoint and args.base != args.checkpoint:
        raise ConfigError(f"--base {args.base!r} and --checkpoint {args.checkpoint!r} name two bases; pass one")
    import torch
    import torch.distributed as dist

    from nemo_adapt.models.builder import check_layout
    from nemo_adapt.models.export import export_hf
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.tokenizer import tokenizer_if_any

    checkpoint = args.checkpoint or args.base
    files = method = None
    if args.adapter:
        from nemo_adapt.artifacts.adapter import open_adapter, open_adapter_base
        from nemo_adapt.peft.base import get_peft_method

        files = open_adapter(args.adapter)
        method = get_peft_method(files.method)
        method.check_mergeable()  # before anything is opened or built
        source = open_adapter_base(files, checkpoint, args.model)
    else:
        source = open_source(checkpoint or EMBEDDED_NAME, args.model)
    check_layout(source.spec, args.tensor_parallel, args.pipeline_parallel)
    runtime.initialize(runtime.ParallelLayout(tensor=args.tensor_parallel, pipeline=args.pipeline_parallel))
    try:
        adapter = None
        if files is not None:
            from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter
            from nemo_adapt.peft.base import apply_peft

            adapter = load_adapter(files, source)  # converted and checked against the base before building
        model, source = load_model(source)  # float32 parameters: the fold is computed in float32
        if adapter is not None:
            apply_peft(model, adapter.config)
            apply_adapter(model, adapter)
            method.merge_into_base(model)
        tok = tokenizer_if_any(source.tokenizer_path, source.location, "export") if dist.get_rank() == 0 else None
        out = export_hf(model, source.spec, args.output, tokenizer=tok, dtype=getattr(torch, args.dtype))
        if dist.get_rank() == 0:
            what = f" with {args.adapter} ({files.method}) merged" if files is not None else ""
            print(f"exported {source.spec.name} ({source.location}){what} to {out}")
    finally:
        runtime.shutdown()
    return 0
