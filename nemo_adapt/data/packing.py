"""Rows of `seq_length` tokens: one example per row, or several packed into one.

Packing uses best-fit decreasing: examples sorted by length (longest first, ties by index, so the
result is the same on every rank and run) each go into the open row with the least room that still
fits them. It is first-fit decreasing's sibling with the same quality bound (<= 11/9 OPT + 1 rows)
but it can be done with a binary search over remaining capacities, O(n log n), which matters for
millions of examples; greedy packing in file order wastes more of each row when long and short
examples alternate. The order of rows is then shuffled per epoch, so grouping similar lengths
together does not bias what a step sees over an epoch.

A row carries, per position t:

    tokens[t]        input id (pad id after the last example)
    labels[t]        tokens[t + 1] inside an example; the pad id at an example's last position
                     (its next token belongs to another example or is padding) and in padding
    loss_mask[t]     1.0 where labels[t] is an answer token of the same example
    position_ids[t]  position inside its example (restarts at 0 for every example and for padding)
    segment_ids[t]   1, 2, ... for the examples of the row, 0 for padding

`attention_mask_from_segments` turns segment ids into Megatron-Core's boolean mask (True = masked)
and `packed_seq_params` into Transformer Engine's cu_seqlens for the THD packed-sequence path.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group examples into rows of at most `capacity` tokens (best-fit decreasing).

    Args:
        lengths: token count of each example (each <= capacity).
        capacity: tokens per row.

    Returns:
        Rows as lists of example indices, in the order the rows were opened.

    Raises:
        ValueError: an example is longer than a row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # Open rows sorted by (room left, row index): bisect finds the tightest row that fits.
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            rows.append([i])
            left, r = capacity - n, len(rows) - 1
        else:
            left, r = room.pop(k)
            rows[r].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, r))
    return rows


def build_row(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int,
              pad_id: int) -> dict[str, torch.Tensor]:
    """Lay out examples one after another in a row of `seq_length` positions.

    Args:
        examples: (token ids, answer mask) per example, each 1-D and of equal length; the total
            length must be <= seq_length.
        seq_length: positions per row.
        pad_id: id for padding positions and for labels that must not be predicted.

    Returns:
        `tokens`, `labels`, `position_ids`, `segment_ids` (int64) and `loss_mask` (float32), each of
        shape [seq_length].

    Raises:
        ValueError: the examples do not fit in the row.
    """
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    segment_ids = np.zeros(seq_length, dtype=np.int64)
    at = 0
    for seg, (ids, answer) in enumerate(examples, start=1):
        n = len(ids)
        if at + n > seq_length:
            raise ValueError(f"examples need {at + n} positions, more than the row's {seq_length}")
        tokens[at:at + n] = ids
        # Next-token labels stay inside the example: position at+n-1 keeps the pad label and a 0
        # mask, so an example's last token is never trained to predict the next example's first.
        labels[at:at + n - 1] = ids[1:]
        loss_mask[at:at + n - 1] = answer[1:]
        position_ids[at:at + n] = np.arange(n)
        segment_ids[at:at + n] = seg
        at += n
    position_ids[at:] = np.arange(seq_length - at)  # padding is its own run, positions from 0
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
    }


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention mask for packed rows, Megatron-Core convention.

    Position i may attend to position j when j <= i and both are in the same segment. Padding
    (segment 0) attends causally to padding only, so no softmax row is fully masked (which would
    give NaNs); its loss is masked anyway.

    Args:
        segment_ids: [b, s] segment id per position.

    Returns:
        Bool tensor [b, 1, s, s], True where attention is masked out.
    """
    s = segment_ids.shape[-1]
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)  # [b, s(query), s(key)]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths over the flattened [b * s] batch, one run per segment.

    Every row boundary and every change of segment id starts a new sequence; padding is a run of
    its own, so the runs cover all b * s positions (what TE's THD format expects of a flattened batch).

    Args:
        segment_ids: [b, s] segment id per position.

    Returns:
        (cu_seqlens int32 [n_runs + 1] starting at 0 and ending at b * s, the longest run).
    """
    b, s = segment_ids.shape
    change = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.nonzero(change.reshape(-1), as_tuple=False).reshape(-1)
    end = torch.tensor([b * s], dtype=starts.dtype, device=starts.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu, max_len


def packed_seq_params(segment_ids: torch.Tensor):
    """Megatron-Core `PackedSeqParams` (THD format) for Transformer Engine's packed attention.

    Use with the batch flattened to [1, b * s] (tokens, position ids, labels) as Megatron-Core's
    THD path expects; the block-diagonal mask from `attention_mask_from_segments` is the
    equivalent for the unfused (CPU) attention path.

    Args:
        segment_ids: [b, s] segment id per position.

    Returns:
        `megatron.core.packed_seq_params.PackedSeqParams` with cu_seqlens_q/kv (int32) and
        max_seqlen_q/kv.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, max_len = cu_seqlens_from_segments(segment_ids)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def causal_chunk_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """Causal mask for a chunk of `sq` queries that are the last `sq` of `sk` keys, Megatron-Core
    convention: query i sits at position sk - sq + i and sees every key up to it. Covers a whole
    sequence (sq = sk), a KV-cache decode step (sq = 1) and a prefill chunk after cached tokens.

    Returns:
        Bool tensor [1, 1, sq, sk], True where attention is masked out.
    """
    q = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    return (torch.arange(sk, device=device).unsqueeze(0) > q).view(1, 1, sq, sk)
