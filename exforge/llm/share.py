"""Weight sharing: one matrix for a model's input embeddings and its output head.

`tie_embeddings` makes `embed_tokens` use the output head's weight (the same tensor, so
one storage) and marks the configuration tied, so `save_pretrained` writes the matrix
once and every loader ties the two again. With Tekken's 131,072-token vocabulary the two
matrices are most of a small model's bytes.
"""

from __future__ import annotations

from transformers import MistralForCausalLM


def tie_embeddings(model: MistralForCausalLM) -> MistralForCausalLM:
    """Share the output head's weight with the input embeddings (in place)."""
    model.model.embed_tokens.weight = model.lm_head.weight
    model.config.tie_word_embeddings = True
    return model


def embeddings_tied(model: MistralForCausalLM) -> bool:
    """Whether input embeddings and output head are one storage."""
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return embed.data_ptr() == head.data_ptr()
