"""Worker of `test_multi_lora_tp.py` (torchrun): several LoRA adapters served over `random:tiny_llama` at a TP
layout — a mixed-adapter batch's greedy tokens, each row's tokens after a hot-swap to its adapter alone, and the
mixed batch's logits.

Rank 0 writes {"mixed": [[ids]], "alone": [[ids]], "logits": [[[...]]]} to --out.

Usage: torchrun --standalone --nproc-per-node 2 multi_lora_worker.py --tp 2 --adapters DIR,DIR --index 0,1,-1
       --prompts JSON --new-tokens N --out FILE
"""

import argparse
import json

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate
    from nemo_adapt.generation.multi_lora import MultiLoRA, load_lora_adapters, serving_config
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft

    runtime.initialize(runtime.ParallelLayout(tensor=args.tp), seed=0)
    model, source = load_model(open_source("random:tiny_llama", "tiny_llama"))
    spec = source.spec
    adapters = load_lora_adapters(args.adapters.split(","), source)
    apply_peft(model, serving_config(adapters), seed=0)
    index = [int(i) for i in args.index.split(",")]
    prompts = json.loads(args.prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens)

    def gen(batch):
        return generate(model, batch, params, set(), spec.vocab_size, spec.hidden_size, spec.max_position_embeddings)

    with MultiLoRA(model, adapters) as served:
        with served.mixed(index):
            mixed = gen(prompts)
            same_length = [p[:min(map(len, prompts))] for p in prompts]
            logits = forward_logits(model, torch.tensor(same_length), spec.vocab_size, spec.hidden_size)
        alone = []
        for p, k in zip(prompts, index):
            served.activate(k)
            alone.append(gen([p])[0])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"mixed": mixed, "alone": alone, "logits": logits.tolist()}, f)
    runtime.shutdown()


if __name__ == "__main__":
    main()
