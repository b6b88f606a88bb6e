"""Mistral 7B (Jiang et al. 2023, "Mistral 7B"); numbers from mistralai/Mistral-7B-v0.3 config.json.

v0.3 drops the sliding window of v0.1 and extends the vocabulary to 32768.
"""

from nemo_adapt.models.spec import ModelSpec, register_model

register_model(ModelSpec(
    name="mistral_7b", family="mistral", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
    num_attention_heads=32, num_query_groups=8, vocab_size=32768, max_position_embeddings=32768,
    rope_theta=1000000.0, norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    description="Mistral-7B v0.3", hf_extra={"sliding_window": None}))
