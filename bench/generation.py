"""Batched greedy generation speed: nemo-adapt (Megatron-Core, KV cache) vs transformers `generate`,
same model (embedded SmolLM2-135M-Instruct GGUF, fp32, CPU), same prompts, same token budget.

Prints both sides and the ratio; never fails on a time. Usage:
    .venv/bin/python bench/generation.py [--batch 8] [--new-tokens 64] [--repeats 3]
"""

import argparse
import time
import warnings

import torch

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "What is 2+2?", "Explain photosynthesis in one sentence.", "Give me a synonym for happy.",
    "What is the boiling point of water?", "List two prime numbers.",
]


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from nemo_adapt.generation.generate import SamplingParams, generate
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime
    from nemo_adapt.tokenizer import load_tokenizer

    runtime.initialize(runtime.ParallelLayout())
    model, src = load_model("embedded:smollm2_135m")
    spec = src.spec
    tok = load_tokenizer(src.tokenizer_path)
    qs = (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in qs]
    # Ignore EOS on both sides so both generate exactly the same number of tokens.
    params = SamplingParams(max_new_tokens=args.new_tokens)

    def ours():
        out = generate(model, prompts, params, set(), spec.vocab_size, spec.hidden_size)
        return sum(len(o) for o in out)

    hf = AutoModelForCausalLM.from_pretrained(str(src.tokenizer_path.parent), gguf_file=src.tokenizer_path.name,
                                              dtype=torch.float32).eval()
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")

    def theirs():
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    def best(fn):
        fn()  # warm-up
        times, n = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t)
        return n / min(times), min(times)

    ours_tps, ours_s = best(ours)
    hf_tps, hf_s = best(theirs)
    print(f"batched greedy generation, batch {args.batch}, {args.new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"  nemo-adapt (Megatron-Core)  {ours_tps:8.1f} tokens/s  ({ours_s:.2f} s)")
    print(f"  transformers generate       {hf_tps:8.1f} tokens/s  ({hf_s:.2f} s)")
    print(f"  ratio nemo-adapt / transformers: {ours_tps / hf_tps:.2f}x")
    runtime.shutdown()


if __name__ == "__main__":
    main()
