"""Tiny random-weight configs for tests: same code paths as the real families, seconds on a CPU.

Sizes divide by 2 everywhere (heads, groups, FFN, vocabulary, layers) so TP2, PP2 and TP2xPP2 all work.
"""

from nemo_adapt.models.spec import ModelSpec, register_model

register_model(ModelSpec(
    name="tiny_llama", family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128,
    num_attention_heads=4, num_query_groups=2, vocab_size=256, max_position_embeddings=256,
    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    description="tiny Llama-style test model (tied embeddings)"))
register_model(ModelSpec(
    name="tiny_qwen2", family="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=128,
    num_attention_heads=4, num_query_groups=2, vocab_size=256, max_position_embeddings=256,
    rope_theta=10000.0, norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, description="tiny Qwen2-style test model (qkv bias, untied embeddings)"))
