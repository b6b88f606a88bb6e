"""Packing: best-fit decreasing rows, row layout, block-diagonal masks and cu_seqlens."""

import numpy as np
import pytest
import torch

from nemo_adapt.data import attention_mask_from_segments, cu_seqlens_from_segments, pack_best_fit
from nemo_adapt.data.packing import build_row


def test_best_fit_decreasing_is_deterministic_and_fits():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6, 2, 2]
    rows = pack_best_fit(lengths, 10)
    assert rows == pack_best_fit(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each example exactly once
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 40 tokens in rows of 10: optimal here
    assert rows[0][0] == 4  # the longest example opens the first row
    with pytest.raises(ValueError, match="more than a row"):
        pack_best_fit([11], 10)


def test_build_row_labels_positions_segments():
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], dtype=np.uint8))
    b = (np.array([20, 21, 22]), np.array([0, 1, 1], dtype=np.uint8))
    row = build_row([a, b], seq_length=10, pad_id=2)
    assert row["tokens"].tolist() == [10, 11, 12, 13, 20, 21, 22, 2, 2, 2]
    # labels: next token inside each example; pad at each example's last position (13 -> never 20)
    assert row["labels"].tolist() == [11, 12, 13, 2, 21, 22, 2, 2, 2, 2]
    assert row["loss_mask"].tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert row["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert row["loss_mask"].dtype == torch.float32 and row["tokens"].dtype == torch.int64
    with pytest.raises(ValueError, match="more than the row"):
        build_row([a, b], seq_length=6, pad_id=2)


def test_attention_mask_blocks_cross_example_attention():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = attention_mask_from_segments(seg)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]
    for q in range(6):
        for k in range(6):
            assert bool(allowed[q, k]) == (k <= q and seg[0, q] == seg[0, k]), (q, k)
    assert not allowed[3, 2] and allowed[4, 3]  # example 2 starts fresh, then sees itself causally
    assert allowed.any(dim=-1).all()  # no fully masked query row (would give NaN in softmax)
    torch.testing.assert_close((~mask[1, 0]).int(), torch.ones(6, 6).tril().int())  # one example: causal


def test_masked_attention_equals_separate_attention():
    """Attention over a packed row with the segment mask equals attention over each example alone."""
    torch.manual_seed(0)
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2]])
    q, k, v = (torch.randn(1, 1, 7, 4) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask_from_segments(seg))
    for a, b in ((0, 3), (3, 7)):
        alone = torch.nn.functional.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :],
                                                                 is_causal=True)
        torch.testing.assert_close(packed[..., a:b, :], alone)


def test_cu_seqlens_cover_the_flattened_batch():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    cu, max_len = cu_seqlens_from_segments(seg)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12]
    assert max_len == 6
