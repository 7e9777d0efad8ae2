"""A seeded random MoETransformer and its experts for the executor and generator tests (tests/engine,
tests/experts): the same draws for every test that asks for the same config and seed.

    random_model(cfg, seed=0, norms="unit") -> MoETransformer (eval, every parameter N(0, 0.3))
        norms: "unit"    the layers' input and post-attention RMSNorm weights set to 1 after the draws
               "normal"  left as drawn
               "uniform" every norm weight U(0.5, 1.5) instead (not all ones: an input recovery divides
                         by them)
    random_experts(cfg, seed=0) -> {moe layer: LayerExperts(w13 [E, 2I, D], w2 [E, D, I])}, N(0, 0.3)
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig
from hotexperts.models.transformer import MoETransformer
from hotexperts.weights import LayerExperts

NORMS = ("unit", "normal", "uniform")


def random_model(cfg: ModelConfig, seed: int = 0, norms: str = "unit") -> MoETransformer:
    if norms not in NORMS:
        raise ValueError(f"norms must be one of {NORMS}, got {norms!r}")
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norms == "uniform" and "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)
        if norms == "unit":
            for layer in model.model.layers:
                layer.input_layernorm.weight.fill_(1.0)
                layer.post_attention_layernorm.weight.fill_(1.0)
    return model


def random_experts(cfg: ModelConfig, seed: int = 0) -> dict[int, LayerExperts]:
    g = torch.Generator().manual_seed(seed)
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    return {i: LayerExperts(torch.randn(E, 2 * I, D, generator=g) * 0.3,
                            torch.randn(E, D, I, generator=g) * 0.3) for i in cfg.moe_layers}
