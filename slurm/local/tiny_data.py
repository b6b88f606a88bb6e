"""Write the tiny character-level chat task recipes/tiny_llama_lora_cpu.yaml trains on.

    python slurm/local/tiny_data.py DIR [--rows N] [--seed S]

Each example asks to upper-case a random 4-letter word (letters a-h); the tiny model learns it in a
few dozen steps. Writes DIR/train.jsonl (N rows), DIR/validation.jsonl and DIR/test.jsonl (16 rows each).
"""

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.rows), ("validation", 16), ("test", 16)):
        lines = []
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(4))
            lines.append(json.dumps({"messages": [
                {"role": "system", "content": "Upper-case the word."},
                {"role": "user", "content": word},
                {"role": "assistant", "content": word.upper()}]}))
        (args.dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(args.dir)


if __name__ == "__main__":
    main()
