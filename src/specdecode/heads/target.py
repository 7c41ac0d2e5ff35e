"""What a head takes from its target: the embedding table, the lm_head, the fingerprint."""

from __future__ import annotations


def target_parts(target):
    """(embedding table [V, H], a function giving the lm_head weight [V, H] in the plain
    layout, the target's fingerprint) of a native or hf backend."""
    if hasattr(target, "embed"):  # native
        head = target.lm_head
        return target.embed, head.plain, target.fingerprint()
    model = target.model  # hf: transformers' own modules
    cfg = model.config
    fp = {"model_type": cfg.model_type, "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
          "vocab_size": target.vocab_size}  # fmt: skip
    return model.get_input_embeddings().weight, lambda: model.get_output_embeddings().weight, fp
