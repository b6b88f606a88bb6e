"""Generated domain datasets (deterministic, seeded) used by recipes and tests.

Each domain module (`triage`, `expenses`) owns its rules, texts and labels; the machinery they share —
seeded splits with texts unique across splits, byte-stable JSONL, label shares, the CLI — is here.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

SPLITS = ("train", "validation", "test")


def generate_splits(make_example: Callable, make_record: Callable, sizes: dict[str, int],
                    seed: int) -> dict[str, list[dict]]:
    """Every split, deterministically for a seed, no example text twice or in two splits.

    Args:
        make_example: `(rng, heldout) -> (text, *label)`; heldout is True for validation and test.
        make_record: `(text, *label) -> chat record`.
        sizes: split -> number of examples.
        seed: generator seed.

    Returns:
        split -> chat records.
    """
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for index, split in enumerate(SPLITS):
        rng = random.Random(seed * 1000 + index)  # integer seeds: stable across Python versions
        records: list[dict] = []
        while len(records) < sizes.get(split, 0):
            text, *label = make_example(rng, split != "train")
            if text in seen:  # redraw duplicates: no text may appear twice or in two splits
                continue
            seen.add(text)
            records.append(make_record(text, *label))
        out[split] = records
    return out


def write_jsonl_splits(out_dir: str | Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """Write `<split>.jsonl` files under `out_dir` (created if missing); returns split -> file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in splits.items():
        path = out / f"{split}.jsonl"
        # Fixed key order, UTF-8, "\n" line ends: the bytes depend only on the records.
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path.write_bytes(text.encode("utf-8"))
        paths[split] = path
    return paths


def label_shares(labels: Sequence[tuple[str, str]], names: tuple[str, str]) -> dict[str, dict[str, float]]:
    """Shares of each label part and of each pair: `{names[0]: {...}, names[1]: {...}, "pair": {"a / b": share}}`."""
    n = len(labels)

    def shares(counter: Counter) -> dict[str, float]:
        return {k: round(v / n, 4) for k, v in counter.most_common()}

    return {names[0]: shares(Counter(a for a, _ in labels)), names[1]: shares(Counter(b for _, b in labels)),
            "pair": shares(Counter(f"{a} / {b}" for a, b in labels))}


def run_cli(argv: Sequence[str] | None, description: str, default_out: str, sizes: dict[str, int],
            write_splits: Callable, distribution: Callable, shown: str) -> None:
    """A domain's CLI: write the splits and print each one's label distribution (`shown` part and top pair)."""
    from nemo_adapt.data.formats import iter_lines

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=default_out, help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    for split, n in sizes.items():
        ap.add_argument(f"--{split}", type=int, default=n, help=f"{split} examples (default {n})")
    args = ap.parse_args(argv)
    paths = write_splits(args.out, args.seed, {s: getattr(args, s) for s in sizes})
    for path in paths.values():
        # JSONL lines end at "\n" only: the records are written with ensure_ascii=False, and a U+2028
        # inside a string is a line break to str.splitlines.
        with path.open("rb") as f:
            records = [json.loads(line.data) for line in iter_lines(f) if line.data.strip()]
        d = distribution(records)
        top_pair, top_share = next(iter(d["pair"].items()))
        print(f"{path}: {len(records)} examples; {shown} {d[shown]}; majority pair {top_pair} {100 * top_share:.1f}%")
