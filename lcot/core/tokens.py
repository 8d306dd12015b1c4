"""The latent special tokens: added when absent, always looked up by string."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LATENT_START = "<abs_vis_token>"
LATENT_END = "</abs_vis_token>"
LATENT_PAD = "<abs_vis_token_pad>"
LATENT_TOKENS = (LATENT_START, LATENT_END, LATENT_PAD)
IGNORE = -100  # the label of positions without a loss (transformers' and torch's ignore_index)


@dataclass(frozen=True)
class TokenIds:
    """Ids of every special token the kit uses, read from the tokenizer by string."""

    latent_start: int
    latent_end: int
    latent_pad: int
    image_pad: int
    vision_start: int
    vision_end: int
    im_end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> TokenIds:
        def tid(s: str) -> int:
            i = tok.convert_tokens_to_ids(s)
            if i is None or i == tok.unk_token_id:
                raise KeyError(f"token {s!r} is not in the tokenizer; call add_latent_tokens first")
            return int(i)

        pad = tok.pad_token_id if tok.pad_token_id is not None else tid("<|endoftext|>")
        return cls(tid(LATENT_START), tid(LATENT_END), tid(LATENT_PAD), tid("<|image_pad|>"),
                   tid("<|vision_start|>"), tid("<|vision_end|>"), tid("<|im_end|>"), int(pad))


def add_latent_tokens(tokenizer, model: torch.nn.Module | None = None) -> list[str]:
    """Add the latent tokens where absent; resize the model and set their rows to the mean embedding.

    Returns the tokens that were added (empty when the checkpoint already had them). Rows already
    present (e.g. from an earlier stage) are left alone, whatever their ids.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in LATENT_TOKENS if t not in vocab]
    if not missing:
        return []
    old_len = len(tokenizer)
    tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None:
        new_ids = [tokenizer.convert_tokens_to_ids(t) for t in missing]
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            layers = {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
            for layer in layers.values():
                w = layer.weight
                w[new_ids] = w[:old_len].mean(0, keepdim=True).to(w.dtype)
    return missing
