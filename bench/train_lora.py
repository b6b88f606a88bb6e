"""LoRA training throughput: nemo-adapt (Megatron-Core engine) vs Hugging Face transformers + peft.

Same model (embedded SmolLM2-135M-Instruct, fp32, CPU), same LoRA (rank, alpha, all linear layers
of every layer or of the upper `--upper-layers` only), same batches of triage examples (padded rows,
loss on answer tokens), same AdamW step. Prints tokens/s (all positions) and non-padding tokens/s for
both, and the ratio. Never fails on a time.

    .venv/bin/python bench/train_lora.py [--rank 16] [--batch 8] [--seq-length 256] [--steps 4] [--upper-layers 12]
"""

import argparse
import statistics
import time
import warnings


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--upper-layers", type=int, default=0,
                    help="adapt only the last N decoder layers (0: all), as the main-job recipe does")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nemo_adapt.config.schema import DataConfig, RecipeConfig
    from nemo_adapt.data import build_datasets
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training import engine

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    model, src = load_model("embedded:smollm2_135m")
    tok = load_tokenizer(src.tokenizer_path)
    data = build_datasets(DataConfig(train="datasets/triage/train.jsonl", seq_length=args.seq_length), tok, 0).train
    batches = [data.collate([data[i] for i in range(s * args.batch, (s + 1) * args.batch)])
               for s in range(args.steps + 1)]
    real = [int((b["segment_ids"] > 0).sum()) for b in batches]
    total = args.batch * args.seq_length

    # ---- nemo-adapt: the training engine exactly as `nemo-adapt run` uses it.
    cfg = RecipeConfig()
    cfg.train.global_batch_size = cfg.train.micro_batch_size = args.batch
    model.config.calculate_per_token_loss = True
    n_layers = model.config.num_layers
    layers = list(range(n_layers - args.upper_layers, n_layers)) if args.upper_layers else None
    apply_peft(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, layers=layers), seed=0)
    ddp = engine.wrap_ddp(model, cfg)
    opt = engine.build_optimizer(ddp, cfg)
    engine.connect_schedule_hooks(ddp, opt)
    ours = []
    for s, b in enumerate(batches):
        t = time.perf_counter()
        engine.train_step(ddp, opt, [b], args.seq_length, args.batch, 1e-4)
        if s:
            ours.append(time.perf_counter() - t)
    runtime.shutdown()

    # ---- transformers + peft: same weights (from the same GGUF), same LoRA, same batches.
    hf = AutoModelForCausalLM.from_pretrained(str(src.tokenizer_path.parent), gguf_file=src.tokenizer_path.name,
                                              dtype=torch.float32)
    hf = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], layers_to_transform=layers))
    hf.train()
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    theirs = []
    for s, b in enumerate(batches):
        # Our labels are already shifted; transformers shifts internally, so give it the inputs with
        # -100 wherever we have no loss (the same positions after its shift).
        labels = b["tokens"].clone()
        labels[:, 1:][b["loss_mask"][:, :-1] == 0] = -100
        labels[:, 0] = -100
        attn = (b["segment_ids"] > 0).long()
        t = time.perf_counter()
        out = hf(input_ids=b["tokens"], attention_mask=attn, labels=labels)
        out.loss.backward()
        hf_opt.step()
        hf_opt.zero_grad()
        if s:
            theirs.append(time.perf_counter() - t)

    o, h = statistics.median(ours), statistics.median(theirs)
    nonpad = statistics.mean(real[1:])
    where = f"the last {args.upper_layers} of {n_layers} layers" if layers else "every layer"
    print(f"LoRA r={args.rank} on all linear layers of {where}, SmolLM2-135M fp32, batch {args.batch} x {args.seq_length} "
          f"({nonpad:.0f} non-padding tokens/step), torch threads {torch.get_num_threads()}, median of {args.steps}")
    print(f"  nemo-adapt (Megatron-Core)  {total / o:8.1f} tokens/s  {nonpad / o:8.1f} non-pad tokens/s  ({o:.2f} s/step)")
    print(f"  transformers + peft         {total / h:8.1f} tokens/s  {nonpad / h:8.1f} non-pad tokens/s  ({h:.2f} s/step)")
    print(f"  ratio nemo-adapt / transformers+peft: {h / o:.2f}x")


if __name__ == "__main__":
    main()
