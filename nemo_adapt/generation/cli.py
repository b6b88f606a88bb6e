"""`nemo-adapt generate`: chat with a checkpoint (embedded default, GGUF file or HF directory), with an
adapter (`--adapter`: ours or Hugging Face PEFT) when given, at any TP/PP under torchrun."""

from __future__ import annotations

import argparse
import sys

from nemo_adapt.models.embedded import EMBEDDED_NAME


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model with its chat template",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="*", help="user message(s); one chat per message (batched)")
    p.add_argument("--checkpoint", default=None,
                   help=f"HF directory, .gguf file or embedded name (default: the adapter's base, else {EMBEDDED_NAME})")
    p.add_argument("--adapter", default=None, help="an adapter directory to apply (a nemo-adapt artifact or a "
                   "Hugging Face PEFT adapter); it must belong to the checkpoint")
    p.add_argument("--model", default=None, help="registered architecture to check the checkpoint against")
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--tensor-parallel", type=int, default=1, help="must match the launched world (torchrun)")
    p.add_argument("--pipeline-parallel", type=int, default=1)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch.distributed as dist

    from nemo_adapt.data.tokenize import encode_prompt
    from nemo_adapt.errors import ConfigError
    from nemo_adapt.generation.generate import SamplingParams, generate, stop_token_ids
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.tokenizer import load_tokenizer

    prompts = args.prompt or ([sys.stdin.read().strip()] if not sys.stdin.isatty() else [])
    if not prompts or not all(p.strip() for p in prompts):
        raise ConfigError("give at least one non-empty prompt (argument or standard input)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    # Open and validate the checkpoint (and adapter) before starting process groups or building anything.
    files = None
    if args.adapter:
        from nemo_adapt.artifacts.adapter import open_adapter, open_adapter_base

        files = open_adapter(args.adapter)
        source = open_adapter_base(files, args.checkpoint, args.model)
    else:
        source = open_source(args.checkpoint or EMBEDDED_NAME, args.model)
    from nemo_adapt.models.builder import check_layout

    check_layout(source.spec, args.tensor_parallel, args.pipeline_parallel)
    tok = load_tokenizer(source.tokenizer_path)
    ids = []
    for text in prompts:
        if args.raw or not tok.chat_template:
            ids.append(tok(text)["input_ids"])
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": text})
            ids.append(encode_prompt(tok, messages))

    runtime.initialize(runtime.ParallelLayout(tensor=args.tensor_parallel, pipeline=args.pipeline_parallel),
                       seed=args.seed)
    try:
        adapter = None
        if files is not None:
            from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter
            from nemo_adapt.peft.base import apply_peft

            adapter = load_adapter(files, source)  # checked against the base before the model is built
        model, source = load_model(source)
        if adapter is not None:
            apply_peft(model, adapter.config, seed=args.seed, tokenizer=tok)
            apply_adapter(model, adapter)
        spec = source.spec
        eos = stop_token_ids(spec, tok)
        outputs = generate(model, ids, params, eos, spec.vocab_size, spec.hidden_size,
                           spec.max_position_embeddings)
        if dist.get_rank() == 0:
            for i, out in enumerate(outputs):
                if len(outputs) > 1:
                    print(f"[{i}] ", end="")
                print(tok.decode(out, skip_special_tokens=True).strip())
    finally:
        runtime.shutdown()
    return 0
