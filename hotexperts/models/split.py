"""An HF state dict -> our dense state dict plus stacked routed experts, by the architecture's rename().

    split_state_dict(arch, cfg, hf_sd) -> (dense_sd, {layer: LayerExperts})  (w13 [E,2I,D], w2 [E,D,I])
    assemble_layer(cfg, layer, pieces) -> LayerExperts   (pieces: {(expert|None, which): tensor})
dense_sd loads into MoETransformer(cfg) with load_state_dict(strict=True). Expert tensors may come per
expert or stacked, [out, in] or transposed [in, out] (see models/naming.py), after the architecture's
from_hf hook (GPT-OSS: its interleaved gate/up). Gate/up biases ("gate_up_bias", or "gate_bias" + "up_bias")
become LayerExperts.b13 and the activation is the config's (expert_act). Expert tensors of layers past
the decoder's (an MTP block after the last layer) are left out.
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig
from hotexperts.errors import ModelLoadError
from hotexperts.models.architecture import Architecture
from hotexperts.models.naming import ExpertRef
from hotexperts.weights import ExpertAct, LayerExperts

Pieces = dict[tuple[int | None, str], torch.Tensor]


def _layout(where: str, *checks: tuple[str, torch.Tensor, int, int]) -> bool:
    """Are the matrices stored [..., in, out] (transposed) instead of nn.Linear's [..., out, in]?

    checks: (what, tensor, rows, cols) with the wanted [rows, cols]; square matrices are ambiguous and
    follow the others (e.g. OLMoE's gate_up [E, 2I, D] with 2I == D follows down [E, D, I]).
    """
    flags = []
    for what, t, rows, cols in checks:
        shape = tuple(t.shape[-2:])
        if shape not in ((rows, cols), (cols, rows)):
            raise ModelLoadError(f"{where} {what}: shape {tuple(t.shape)}, expected [E, {rows}, {cols}]")
        if rows != cols:
            flags.append(shape == (cols, rows))
    if len(set(flags)) > 1:
        raise ModelLoadError(f"{where}: expert matrices mix [out, in] and [in, out] layouts")
    return flags[0] if flags else False


def _stacked(pieces: Pieces, which: str, E: int, layer: int) -> torch.Tensor | None:
    """[E, ...] from one stacked tensor or E per-expert tensors; None when absent."""
    if (None, which) in pieces:
        t = pieces[(None, which)]
        if t.shape[0] != E:
            raise ModelLoadError(f"layer {layer} experts.{which}: {t.shape[0]} experts, config says {E}")
        return t
    found = [pieces.get((e, which)) for e in range(E)]
    if all(t is None for t in found):
        return None
    missing = [e for e, t in enumerate(found) if t is None]
    if missing:
        raise ModelLoadError(f"layer {layer}: {which} weight missing for expert(s) {missing[:8]}")
    return torch.stack(found)


def _need(t: torch.Tensor | None, where: str, which: str) -> torch.Tensor:
    if t is None:
        raise ModelLoadError(f"{where}: routed expert {which} weights are missing")
    return t


def assemble_layer(cfg: ModelConfig, layer: int, pieces: Pieces) -> LayerExperts:
    """Stack one layer's expert tensors into LayerExperts(w13 [E,2I,D], w2 [E,D,I])."""
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    where = f"layer {layer}"
    w2 = _need(_stacked(pieces, "down", E, layer), where, "down")                      # [E, D, I]
    fused = _stacked(pieces, "gate_up", E, layer)                                       # [E, 2I, D]
    names = ("gate_up",) if fused is not None else ("gate", "up")
    parts = [fused] if fused is not None else [_need(_stacked(pieces, w, E, layer), where, w) for w in names]
    rows = 2 * I if fused is not None else I
    t = _layout(where, ("down", w2, D, I), *((n, p, rows, D) for n, p in zip(names, parts, strict=True)))
    w13 = torch.cat([p.transpose(1, 2) if t else p for p in parts], dim=1)             # gate rows, up rows
    return LayerExperts(w13.contiguous(), (w2.transpose(1, 2) if t else w2).contiguous(),
                        _bias(cfg, pieces, layer), expert_act(cfg))


def expert_act(cfg: ModelConfig) -> ExpertAct:
    return ExpertAct(cfg.expert_act, cfg.swiglu_alpha, cfg.swiglu_limit)


def _bias(cfg: ModelConfig, pieces: Pieces, layer: int) -> torch.Tensor | None:
    """b13 [E, 2I] from "gate_up_bias" or "gate_bias" + "up_bias"; None without expert biases."""
    if not cfg.expert_bias:
        return None
    E = cfg.num_experts
    fused = _stacked(pieces, "gate_up_bias", E, layer)
    if fused is not None:
        return fused.contiguous()
    parts = [_need(_stacked(pieces, w, E, layer), f"layer {layer}", w) for w in ("gate_bias", "up_bias")]
    return torch.cat(parts, dim=-1).contiguous()


def split_state_dict(arch: Architecture, cfg: ModelConfig, hf_state_dict: dict[str, torch.Tensor]):
    """HF state dict -> (dense state dict for MoETransformer, {layer: LayerExperts})."""
    dense: dict[str, torch.Tensor] = {}
    pieces: dict[int, Pieces] = {}
    for name, t in hf_state_dict.items():
        ref = arch.rename(name)
        t = arch.from_hf(cfg, name, t)
        if isinstance(ref, ExpertRef) and ref.layer >= cfg.num_layers:        # an MTP block's experts
            continue
        if isinstance(ref, ExpertRef):
            pieces.setdefault(ref.layer, {})[(ref.expert, ref.which)] = t
        elif ref is not None:
            dense[ref] = t
    if cfg.tie_word_embeddings:
        dense.pop("lm_head.weight", None)
    unexpected = sorted(set(pieces) - set(cfg.moe_layers))
    if unexpected:
        raise ModelLoadError(f"expert weights found for non-MoE layer(s) {unexpected}")
    return dense, {layer: assemble_layer(cfg, layer, pieces.get(layer, {})) for layer in cfg.moe_layers}
