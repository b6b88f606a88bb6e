"""Shared-prefix prefill in `generate`: the common prompt prefix is computed once and copied to every
batch row's KV cache, the rest of the prefill runs as a masked second chunk; outputs must equal
generating each prompt alone."""

import pytest

from nemo_adapt.data.packing import causal_chunk_mask
from nemo_adapt.generation import generate as G


def test_common_prefix_length():
    assert G.common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3]]) == 3
    assert G.common_prefix_length([[1, 2], [7, 2]]) == 0
    assert G.common_prefix_length([[4, 5, 6]]) == 3


def test_causal_chunk_mask_aligns_queries_at_the_end():
    # 2 queries at positions 3 and 4 over 5 keys (3 cached + 2 new); True = masked.
    mask = causal_chunk_mask(2, 5, "cpu")
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[False, False, False, False, True],
                                   [False, False, False, False, False]]


@pytest.mark.megatron
def test_batched_generation_with_shared_prefix_equals_each_prompt_alone(monkeypatch, smollm2_chat_prompts):
    """The embedded SmolLM2 on its chat template: every prompt starts with the same system prompt and
    user header, and the questions differ in length, so the prefill has both a shared prefix and a
    masked multi-token second chunk."""
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    model, source = load_model("embedded:smollm2_135m", "smollm2_135m")
    spec = source.spec
    prompts = smollm2_chat_prompts
    shared = G.common_prefix_length(prompts)
    assert shared >= G.MIN_SHARED_PREFIX and min(map(len, prompts)) - shared >= 3
    params = G.SamplingParams(max_new_tokens=8)

    def run(batch):
        return G.generate(model, batch, params, set(), spec.vocab_size, spec.hidden_size,
                          spec.max_position_embeddings)

    copies = []
    original = G._copy_cached_row
    monkeypatch.setattr(G, "_copy_cached_row", lambda ctx, n: (copies.append(n), original(ctx, n)))
    assert G.accepts_chunk_masks(model)
    batched = run(prompts)
    assert copies == [shared]  # the prefix was computed once and shared
    alone = [run([p])[0] for p in prompts]
    assert copies == [shared]  # batches of one share nothing
    # Sharing changed nothing: the same greedy tokens as each prompt alone, and as without sharing.
    assert batched == alone
    monkeypatch.setattr(G, "MIN_SHARED_PREFIX", 10**6)
    assert run(prompts) == batched
    assert all(len(out) == 8 for out in batched)
