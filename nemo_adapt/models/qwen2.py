"""Qwen2.5 (Qwen team 2024, "Qwen2.5 Technical Report"); numbers from Qwen/Qwen2.5-7B config.json.

Qwen2 differs from Llama by a bias on the query/key/value projections.
"""

from nemo_adapt.models.spec import ModelSpec, register_model

register_model(ModelSpec(
    name="qwen25_7b", family="qwen2", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
    num_attention_heads=28, num_query_groups=4, vocab_size=152064, max_position_embeddings=131072,
    rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, bos_token_id=151643, eos_token_id=151643,
    description="Qwen2.5-7B (qkv bias)", hf_extra={"use_sliding_window": False}))
