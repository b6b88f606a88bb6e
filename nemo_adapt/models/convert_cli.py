"""`nemo-adapt export`: convert a checkpoint (GGUF, HF directory, embedded) to a Hugging Face
directory that `transformers` and serving tools load. Run under torchrun to export from a TP/PP
layout; the files do not depend on TP."""

from __future__ import annotations

import argparse

from nemo_adapt.models.embedded import EMBEDDED_NAME


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", help="destination directory (replaced atomically if it exists)")
    p.add_argument("--checkpoint", default=EMBEDDED_NAME, help="HF directory, .gguf file or embedded name")
    p.add_argument("--model", default=None, help="registered architecture to check the checkpoint against")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--pipeline-parallel", type=int, default=1)
    p.add_argument("--adapter", help="a nemo-adapt adapter artifact directory to export (with --format peft)")
    p.add_argument("--format", choices=["hf", "peft"], default="hf",
                   help="hf: a Hugging Face model directory; peft: a Hugging Face PEFT adapter (needs --adapter)")
    p.add_argument("--base", help="with --adapter: the base checkpoint (default: the one the artifact names)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nemo_adapt.models.hf import check_replaceable

    check_replaceable(args.output)  # before any work: the output replaces the directory whole
    if args.format == "peft" or args.adapter:
        from nemo_adapt.errors import ConfigError

        if args.format != "peft":
            raise ConfigError("--adapter exports with --format peft (an HF PEFT adapter); a merged Hugging Face "
                              "model from an adapter is not available yet")
        if not args.adapter:
            raise ConfigError("--format peft exports an adapter: pass --adapter ADAPTER_DIR")
        from nemo_adapt.artifacts.hf_peft import export_peft

        out = export_peft(args.adapter, args.output, args.base)
        print(f"exported {args.adapter} as a Hugging Face PEFT adapter to {out}")
        return 0
    import torch
    import torch.distributed as dist

    from nemo_adapt.models.builder import check_layout
    from nemo_adapt.models.export import export_hf
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.tokenizer import load_tokenizer

    source = open_source(args.checkpoint, args.model)
    check_layout(source.spec, args.tensor_parallel, args.pipeline_parallel)
    runtime.initialize(runtime.ParallelLayout(tensor=args.tensor_parallel, pipeline=args.pipeline_parallel))
    try:
        model, source = load_model(source)
        tok = load_tokenizer(source.tokenizer_path)
        out = export_hf(model, source.spec, args.output, tokenizer=tok, dtype=getattr(torch, args.dtype))
        if dist.get_rank() == 0:
            print(f"exported {source.spec.name} ({source.location}) to {out}")
    finally:
        runtime.shutdown()
    return 0
