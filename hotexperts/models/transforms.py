"""Model transformations applied from outside (gpt-fast style): they change how a built model computes,
never what it computes, its parameter names or its state_dict.

    fuse_qkv(model, enable=True) -> model   every Attention's q/k/v projections as one matmul (decode: one
                                            GEMV launch instead of three); enable=False: three again

Fusing happens now, on the model's current device and dtype; a later .to() / .cuda() / .half() fuses again
on the new one (Attention._apply), so the fused weight never goes stale.
"""

from __future__ import annotations

from torch import nn

from hotexperts.models.layers import Attention, HostEmbedding


def fuse_qkv(model: nn.Module, enable: bool = True) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_qkv(enable)
    return model


def host_embedding(model: nn.Module, device) -> nn.Module:
    """The token embedding moved to host memory (models/layers.HostEmbedding); a tied LM head keeps its GPU
    copy, so this is for untied models (the loaders call it on CUDA)."""
    stack = model.model
    if not isinstance(stack.embed_tokens, HostEmbedding):
        stack.embed_tokens = HostEmbedding(stack.embed_tokens.weight, device)
    return model


def staged_embedding(model: nn.Module) -> HostEmbedding | None:
    """The model's HostEmbedding, for the decode runner to stage each token's row, or None."""
    emb = model.model.embed_tokens
    return emb if isinstance(emb, HostEmbedding) else None
