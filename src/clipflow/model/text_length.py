"""Text batches run on their longest prompt's length, where that gives the same embeddings.

An open_clip CLIP text tower attends causally (position p sees positions 0..p only) and pools
the position of the highest token id, the end-of-text token. Every position after a batch's last
pooled one is computed and thrown away: cutting the tokens there changes no embedding, and short
prompts (a few words, where a context holds 77 tokens) cost a fraction of the full context.

open_clip itself cannot run a shorter batch: `CLIP.encode_text` adds the whole positional
embedding and passes the whole causal mask, and `TextTransformer` slices the one but not the
other. `encode_tokens` runs the same layers on both cut to the batch's length.

torch and open_clip are imported where they are used, as in `clipflow.model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def text_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding `model`'s text layers, if a batch cut after its last pooled position is exact.

    That is an open_clip `CLIP`, whose text layers are its own attributes, or a `CustomTextCLIP`
    whose text tower is open_clip's `TextTransformer`; either with the causal mask and argmax
    (end-of-text) pooling. Others return None and run on the full context: a bidirectional
    tower (SigLIP's), pooling at the first or last position or none, a class token appended
    after the text (CoCa), padding masks, and Hugging Face text towers.
    """
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if type(model) is CLIP:
        tower, pool_type = model, model.text_pool_type
    elif type(model) is CustomTextCLIP and type(model.text) is TextTransformer:
        tower, pool_type = model.text, model.text.pool_type
        if tower.cls_emb is not None or tower.use_pad_mask:
            return None
    else:
        return None
    return tower if pool_type == "argmax" and _is_causal(tower.attn_mask) else None


def trimmable(model: torch.nn.Module) -> bool:
    """Whether `model`'s text batches may run on their longest prompt's length (see `text_tower`)."""
    return text_tower(model) is not None


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)`, on the tokens up to the batch's last pooled position where that is exact.

    Args:
        model: an open_clip model.
        tokens: (N, context_length) token ids, as its tokenizer returns them.

    Returns:
        (N, D) text features, not normalised, as `model.encode_text` returns them.
    """
    import torch
    from open_clip.transformer import text_global_pool

    tower = text_tower(model)
    if tower is None:
        return model.encode_text(tokens)
    # argmax pooling reads the first position of each row's highest id; nothing after the last
    # such position in the batch can reach it through a causal mask.
    length = int(tokens.argmax(dim=-1).max()) + 1
    if length == tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :length]  # (N, L)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)  # (N, L, W)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, "argmax")  # (N, W)
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def _is_causal(mask: torch.Tensor | None) -> bool:
    """Whether `mask` is the additive causal mask open_clip builds: -inf above the diagonal, 0 elsewhere."""
    import torch

    return mask is not None and mask.ndim == 2 and torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1))
