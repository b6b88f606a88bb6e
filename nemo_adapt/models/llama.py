"""Meta Llama 3 / 3.1 (Grattafiori et al. 2024, "The Llama 3 Herd of Models").

Numbers from the published config.json files of meta-llama/Meta-Llama-3-8B, -70B and Llama-3.1-*.
"""

from nemo_adapt.models.spec import ModelSpec, RopeScaling, register_model

_LLAMA3_VOCAB = 128256
_LLAMA3 = dict(family="llama", vocab_size=_LLAMA3_VOCAB, rope_theta=500000.0, norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001)

register_model(ModelSpec(
    name="llama3_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
    num_query_groups=8, max_position_embeddings=8192, description="Llama-3 8B", **_LLAMA3))
register_model(ModelSpec(
    name="llama3_70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
    num_query_groups=8, max_position_embeddings=8192, description="Llama-3 70B", **_LLAMA3))
register_model(ModelSpec(
    name="llama31_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
    num_query_groups=8, max_position_embeddings=131072, rope_scaling=RopeScaling(),
    description="Llama-3.1 8B (128k context, llama3 RoPE scaling)", **_LLAMA3))
register_model(ModelSpec(
    name="llama31_70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
    num_query_groups=8, max_position_embeddings=131072, rope_scaling=RopeScaling(),
    description="Llama-3.1 70B (128k context, llama3 RoPE scaling)", **_LLAMA3))
register_model(ModelSpec(
    name="llama31_405b", num_layers=126, hidden_size=16384, ffn_hidden_size=53248, num_attention_heads=128,
    num_query_groups=8, max_position_embeddings=131072, rope_scaling=RopeScaling(),
    description="Llama-3.1 405B (128k context, llama3 RoPE scaling)", **_LLAMA3))
