"""Worker launched by `torchrun` in the distributed tests: load a checkpoint at a TP/PP layout,
write full-vocabulary logits for given prompts, greedy generations and (optionally) an HF export.

Usage: torchrun --standalone --nproc-per-node N parity_worker.py --checkpoint C --tp T --pp P --out DIR
       --prompts prompts.json [--generate 32] [--export DIR]
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--export", default=None)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate
    from nemo_adapt.models.export import export_hf
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime

    runtime.initialize(runtime.ParallelLayout(tensor=args.tp, pipeline=args.pp))
    model, source = load_model(args.checkpoint, args.model)
    spec = source.spec
    prompts = json.loads(Path(args.prompts).read_text())
    out = Path(args.out)
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    logits = {}
    for i, p in enumerate(prompts):
        lg = forward_logits(model, torch.tensor([p]), spec.vocab_size, spec.hidden_size)
        if writer:
            logits[f"prompt{i}"] = lg[0].contiguous()
    if writer:
        save_file(logits, str(out / "logits.safetensors"))
    if args.generate:
        eos = set(spec.eos_token_ids)
        gen = generate(model, prompts, SamplingParams(max_new_tokens=args.generate), eos,
                       spec.vocab_size, spec.hidden_size)
        if torch.distributed.get_rank() == 0:
            (out / "generated.json").write_text(json.dumps(gen))
    if args.export:
        export_hf(model, spec, args.export)
    runtime.shutdown()


if __name__ == "__main__":
    main()
