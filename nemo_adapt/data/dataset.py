"""Tokenized, packed, cached datasets: what the trainer iterates over.

`build_datasets(cfg.data, tokenizer, seed)` reads each split (formats.py), tokenizes it with the
chat template and answer-only loss (tokenize.py), applies the over-length policy, lays examples out
in rows (packing.py) and caches the result under its fingerprint (fingerprint.py). A second run on
the same bytes, tokenizer and settings loads the cache instead of tokenizing again.

Rows are built on access from compact arrays (tokens of each kept example, back to back), so the
cache holds no padding and a 2,048-token row costs nothing until it is read.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import torch

from nemo_adapt.data import fingerprint as fpr
from nemo_adapt.data.formats import DataError, data_path_problem, read_records, skip_warning
from nemo_adapt.data.packing import build_row, pack_best_fit
from nemo_adapt.data.tokenize import pad_token_id, tokenize_records, tokenizer_identity
from nemo_adapt.tokenizer import cache_dir as default_cache_root

if TYPE_CHECKING:
    from nemo_adapt.config.schema import DataConfig

ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")
"""The tensors of a row (and, stacked, of a batch)."""


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch.

    Args:
        rows: rows from `Dataset.__getitem__`, all of the same length.

    Returns:
        The same keys, each a [b, s] tensor.

    Raises:
        ValueError: no rows were given.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def epoch_permutation(n: int, epoch: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (n, epoch, seed).

    `random.Random` seeded with an integer and its `shuffle` have produced the same sequence on
    every CPython since 3.2 and do not depend on numpy/torch versions or on the rank, so every rank
    of every run agrees on the order.

    Args:
        n: number of items.
        epoch: epoch number.
        seed: run seed.

    Returns:
        The permutation.
    """
    key = hashlib.sha256(f"nemo-adapt-epoch:{seed}:{epoch}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(key[:8], "big")).shuffle(order)
    return order


class Dataset:
    """Rows of one split: `len()`, `ds[i]` -> dict of 1-D tensors, `epoch_order`, `collate`.

    Attributes:
        name: split name (`train`, `validation`).
        seq_length: positions per row.
        pad_id: id used for padding and for labels that are not trained on.
        shuffle: whether `epoch_order` permutes rows.
        seed: default seed for `epoch_order`.
        fingerprint: the split's content fingerprint.
        stats: counts for the split (see `build_datasets`).
        cache_path: the cache entry behind this split.
        cache_hit: True when it was loaded from the cache rather than tokenized now.
    """

    collate = staticmethod(collate)

    def __init__(self, name: str, arrays: dict[str, np.ndarray], seq_length: int, pad_id: int,
                 shuffle: bool, seed: int, fingerprint: str, stats: dict, cache_path: Path,
                 cache_hit: bool):
        self.name = name
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.seed = seed
        self.fingerprint = fingerprint
        self.stats = stats
        self.cache_path = cache_path
        self.cache_hit = cache_hit
        self._tokens = arrays["tokens"]
        self._answer = arrays["answer_mask"]
        self._example_offsets = arrays["example_offsets"]
        self._row_offsets = arrays["row_offsets"]
        self._row_examples = arrays["row_examples"]

    def __len__(self) -> int:
        return len(self._row_offsets) - 1

    @property
    def num_examples(self) -> int:
        """Examples laid out in the rows (kept after the over-length policy)."""
        return len(self._example_offsets) - 1

    def example(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """One kept example's token ids and answer mask (before the next-token shift).

        Args:
            j: example index, 0 <= j < num_examples.

        Returns:
            (token ids int64, answer mask uint8), both 1-D.
        """
        a, b = int(self._example_offsets[j]), int(self._example_offsets[j + 1])
        return self._tokens[a:b].astype(np.int64), self._answer[a:b]

    def row_examples(self, i: int) -> list[int]:
        """Indices of the examples laid out in row `i`, in row order.

        Args:
            i: row index.

        Returns:
            Example indices.
        """
        a, b = int(self._row_offsets[i]), int(self._row_offsets[i + 1])
        return [int(j) for j in self._row_examples[a:b]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Row `i`: tokens, labels, loss_mask, position_ids, segment_ids, each [seq_length].

        Raises:
            IndexError: `i` is out of range.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {self.name} split with {n} rows")
        i %= n
        return build_row([self.example(j) for j in self.row_examples(i)], self.seq_length, self.pad_id)

    def epoch_order(self, epoch: int, seed: int | None = None) -> list[int]:
        """The order rows are visited in one epoch; the same on every rank and every run.

        Args:
            epoch: epoch number (0-based).
            seed: run seed (default: the seed the datasets were built with).

        Returns:
            A permutation of range(len(self)) when shuffling, else the identity.
        """
        if not self.shuffle:
            return list(range(len(self)))
        return epoch_permutation(len(self), epoch, self.seed if seed is None else seed)


@dataclass
class Datasets:
    """What `build_datasets` returns.

    Attributes:
        train: the training rows.
        validation: the validation rows, or None.
        fingerprint: split -> fingerprint (train, validation and test where configured) and
            `combined` over them; the trainer stores it with the run.
        stats: split -> counts (see `build_datasets`).
        settings: the data settings that went into the fingerprints.
    """

    train: Dataset
    validation: Dataset | None
    fingerprint: dict[str, str]
    stats: dict[str, dict]
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-serialisable summary to save with a run: fingerprints, settings, stats.

        Returns:
            The summary.
        """
        return {"fingerprint": dict(self.fingerprint), "settings": dict(self.settings),
                "stats": {k: dict(v) for k, v in self.stats.items()}}


def _settings(cfg: DataConfig) -> dict:
    return {k: getattr(cfg, k) for k in fpr.TOKENIZATION_SETTINGS}


def _tokenize_split(path: str, cfg: DataConfig, tokenizer) -> tuple[dict[str, np.ndarray], dict]:
    """Read, tokenize, apply the over-length policy and pack one split; arrays + stats."""
    rf = read_records(path, cfg.format, cfg.on_bad_record, cfg.max_record_bytes)
    examples = tokenize_records(tokenizer, rf.records, cfg.system_prompt,
                                replace_system_prompt=cfg.replace_system_prompt)
    seq = cfg.seq_length
    kept_ids: list[list[int]] = []
    kept_mask: list[list[int]] = []
    truncated = dropped_over_length = dropped_no_answer = 0
    raw_lengths = [len(e.input_ids) for e in examples]
    # The first few file lines of each length outcome, so the report can name them.
    length_lines: dict[str, list[int]] = {"truncated": [], "dropped": []}

    def note(kind: str, record) -> None:
        if len(length_lines[kind]) < _NAMED_LINES:
            length_lines[kind].append(record.line)

    for ex, record in zip(examples, rf.records):
        ids, mask = ex.input_ids, ex.answer_mask
        if len(ids) > seq:
            if cfg.over_length == "drop":
                dropped_over_length += 1
                note("dropped", record)
                continue
            ids, mask = ids[:seq], mask[:seq]
            # An answer token only trains when it is a label, i.e. not at position 0.
            if not any(mask[1:]):
                dropped_no_answer += 1
                note("dropped", record)
                continue
            truncated += 1
            note("truncated", record)
        elif not any(mask[1:]):
            dropped_no_answer += 1
            note("dropped", record)
            continue
        kept_ids.append(ids)
        kept_mask.append(mask)
    if not kept_ids:
        raise DataError(f"no examples of {path!r} fit in data.seq_length={seq}: {dropped_over_length} dropped "
                        f"as longer (data.over_length={cfg.over_length!r}), {dropped_no_answer} left without "
                        f"answer tokens after truncation (longest example: {max(raw_lengths)} tokens)")

    lengths = [len(x) for x in kept_ids]
    rows = pack_best_fit(lengths, seq) if cfg.packing else [[j] for j in range(len(kept_ids))]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {
        "tokens": np.fromiter((t for x in kept_ids for t in x), dtype=np.int32, count=int(offsets[-1])),
        "answer_mask": np.fromiter((t for x in kept_mask for t in x), dtype=np.uint8, count=int(offsets[-1])),
        "example_offsets": offsets,
        "row_offsets": np.cumsum([0] + [len(r) for r in rows], dtype=np.int64),
        "row_examples": np.fromiter((j for r in rows for j in r), dtype=np.int64, count=len(lengths)),
    }
    tokens = int(offsets[-1])
    answer_tokens = int(sum(sum(m[1:]) for m in kept_mask))  # = sum of loss_mask over all rows
    stats = {
        "format": rf.format,
        "examples": len(rf.records),
        "skipped": rf.skipped,
        "skipped_total": sum(rf.skipped.values()),
        "skipped_lines": rf.skipped_lines,
        "bom": rf.bom,
        "kept": len(kept_ids),
        "truncated": truncated,
        "dropped": dropped_over_length + dropped_no_answer,
        "dropped_over_length": dropped_over_length,
        "dropped_no_answer": dropped_no_answer,
        "truncated_lines": length_lines["truncated"],  # first file lines of each, for the report
        "dropped_lines": length_lines["dropped"],
        # examples whose messages hold special-token text (e.g. "<|im_end|>"), trained as plain text
        "special_token_text": sum(e.special_token_text for e in examples),
        "tokens": tokens,
        "answer_tokens": answer_tokens,
        "rows": len(rows),
        "seq_length": seq,
        # non-pad tokens / all positions: 1.0 means no padding at all
        "packing_efficiency": round(tokens / (len(rows) * seq), 6),
        "example_tokens_max": max(raw_lengths),
        "example_tokens_mean": round(sum(raw_lengths) / len(raw_lengths), 2),
    }
    return arrays, stats


def _build_split(name: str, path: str, cfg: DataConfig, tokenizer, tok_sha: str, cache_root: Path,
                 shuffle: bool, seed: int) -> Dataset:
    problem = data_path_problem(path)
    if problem is not None:
        raise DataError(f"data.{name}={path!r} {problem}")
    fp = fpr.split_fingerprint(fpr.sha256_file(path), tok_sha, _settings(cfg))
    entry = fpr.cache_file(cache_root, fp)
    hit = fpr.load_cache(entry, fp)
    if hit is not None:
        arrays, meta = hit
        stats = meta["stats"]
    else:
        arrays, stats = _tokenize_split(path, cfg, tokenizer)
        fpr.save_cache(entry, arrays, {"fingerprint": fp, "stats": stats})
    stats = {"file": str(path), "fingerprint": fp, **stats}
    return Dataset(name, arrays, cfg.seq_length, pad_token_id(tokenizer), shuffle, seed, fp, stats,
                   entry, cache_hit=hit is not None)


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> Datasets:
    """Read, tokenize, pack and cache the training and validation splits.

    Per split, `stats` holds: `examples` (valid records), `skipped` (reason -> count),
    `skipped_total`, `skipped_lines` (reason -> first skipped line numbers), `bom` (the file starts
    with a UTF-8 byte-order mark), `kept`, `truncated`, `dropped` (= `dropped_over_length` + `dropped_no_answer`), `tokens`
    (non-pad tokens in rows), `answer_tokens` (positions with loss), `rows`, `packing_efficiency`
    (tokens / (rows * seq_length)), `example_tokens_max/mean` (before truncation), `format`, `file`
    and `fingerprint`.

    Args:
        cfg: the `data` section of a recipe.
        tokenizer: a `transformers` tokenizer with a chat template.
        seed: the run seed (default seed of `Dataset.epoch_order`).

    Returns:
        The datasets, their fingerprints and stats.

    Raises:
        DataError: a file is missing, a directory, empty, has no valid records, a bad or too large
            record (with `on_bad_record="error"`), or no example fits in `seq_length`.
    """
    if not cfg.train:
        raise DataError("data.train is not set; expected the path of a JSONL file")
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root() / "datasets"
    tok_sha = fpr.sha256_text(tokenizer_identity(tokenizer))
    train = _build_split("train", cfg.train, cfg, tokenizer, tok_sha, cache_root, cfg.shuffle, seed)
    validation = None
    if cfg.validation:
        validation = _build_split("validation", cfg.validation, cfg, tokenizer, tok_sha, cache_root,
                                  False, seed)
    fingerprints = {"train": train.fingerprint}
    stats = {"train": train.stats}
    if validation is not None:
        fingerprints["validation"] = validation.fingerprint
        stats["validation"] = validation.stats
    if cfg.test:
        # The test split is read by the evaluator, not tokenized here; its fingerprint still
        # identifies what the run was evaluated on.
        problem = data_path_problem(cfg.test)
        if problem is not None:
            raise DataError(f"data.test={cfg.test!r} {problem}")
        fingerprints["test"] = fpr.split_fingerprint(fpr.sha256_file(cfg.test), tok_sha, _settings(cfg))
    fingerprints["combined"] = fpr.combined_fingerprint(fingerprints)
    return Datasets(train=train, validation=validation, fingerprint=fingerprints, stats=stats,
                    settings={**_settings(cfg), "tokenizer_sha256": tok_sha})


def format_stats(name: str, stats: dict) -> str:
    """One log line for a split's stats.

    Args:
        name: split name.
        stats: the split's stats from `build_datasets`.

    Returns:
        E.g. `train: 2000 examples -> 2000 kept (3 truncated, 0 dropped, 1 skipped) in 160 rows,
        290,000 tokens (31,000 with loss), packing efficiency 88.5%`, followed by `; UTF-8 byte-order
        mark at the start ignored` when the file has one.
    """
    dropped = stats["dropped"]
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items())
    bom = "; UTF-8 byte-order mark at the start ignored" if stats.get("bom") else ""
    return (f"{name}: {stats['examples']} examples -> {stats['kept']} kept ({stats['truncated']} truncated, "
            f"{dropped} dropped, {stats['skipped_total']} skipped{': ' + skipped if skipped else ''}) in "
            f"{stats['rows']} rows, {stats['tokens']:,} tokens ({stats['answer_tokens']:,} with loss), "
            f"packing efficiency {100 * stats['packing_efficiency']:.1f}%{bom}{_special_note(stats)}")


def _special_note(stats: dict) -> str:
    n = stats.get("special_token_text", 0)
    return f"; {n} example(s) contain special-token text, encoded as plain text" if n else ""


def split_skip_warning(name: str, stats: dict) -> str | None:
    """The warning line for a split whose records were skipped (see `formats.skip_warning`).

    Args:
        name: split name (the recipe key is `data.<name>`).
        stats: the split's stats from `build_datasets` (they hold `file`, `skipped`, `skipped_lines`).

    Returns:
        The warning, or None when no record was skipped.
    """
    return skip_warning(stats.get("file", "?"), stats["skipped"], stats.get("skipped_lines"), key=f"data.{name}")


_NAMED_LINES = 5
"""File lines named per length outcome (truncated, dropped) in a split's stats and report."""


def length_note(name: str, stats: dict) -> str | None:
    """One line naming the first examples truncated or dropped for length (file:line), or None.

    Args:
        name: split name.
        stats: the split's stats from `build_datasets`.
    """
    parts = []
    for kind, count in (("truncated", stats.get("truncated", 0)), ("dropped", stats.get("dropped", 0))):
        lines = stats.get(f"{kind}_lines") or []
        if count and lines:
            more = f" and {count - len(lines)} more" if count > len(lines) else ""
            where = ", ".join(f"{stats.get('file', '?')}:{n}" for n in lines)
            parts.append(f"{kind} {count} ({where}{more})")
    if not parts:
        return None
    return (f"note: {name} examples longer than data.seq_length={stats['seq_length']} "
            f"(data.over_length): {'; '.join(parts)}")


def print_data_report(data: Datasets, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Print each split's stats line, a line naming examples truncated or dropped for length, and a
    warning line for each split with skipped records.

    Args:
        data: what `build_datasets` returned.
        out: where the stats lines go (default: sys.stdout at call time).
        err: where the warnings go (default: sys.stderr at call time).
    """
    for name, stats in data.stats.items():
        print(format_stats(name, stats), file=out or sys.stdout, flush=True)
        lengths = length_note(name, stats)
        if lengths is not None:
            print(lengths, file=out or sys.stdout, flush=True)
        warning = split_skip_warning(name, stats)
        if warning is not None:
            print(warning, file=err or sys.stderr, flush=True)


def data_summary(data: Datasets) -> dict[str, int]:
    """Skip counts per split for the run summary: `data/<split>/skipped` and `data/<split>/skipped/<reason>`.

    Args:
        data: what `build_datasets` returned.

    Returns:
        Flat name -> count (the total is there also when it is 0).
    """
    out: dict[str, int] = {}
    for name, stats in data.stats.items():
        out[f"data/{name}/skipped"] = int(stats["skipped_total"])
        for reason, count in stats["skipped"].items():
            out[f"data/{name}/skipped/{reason}"] = int(count)
    return out
