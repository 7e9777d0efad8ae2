"""QuantLinear: nn.Linear's forward over a weight kept quantized (int8 / int8gG, weights.py) on its device,
and quantize_linears(model, ...): the transformation that puts them in a built model (applied from outside:
the GGUF loader keeps Q8_0 dense tensors this way; `--dense-quant q8` quantizes a bf16 model's).

    lin = QuantLinear(out_features, in_features, fmt, bias=False, zero=False)   # buffers q, scale (, zero)
    y = lin(x [..., K]) -> [..., N] in x.dtype        (kernels/qlinear.py: GEMV in decode, else dequant+GEMM)
    quantize_linears(model, names)   swaps the nn.Linear modules named (dotted paths) for empty QuantLinears
                                     of their shape; their state_dict entries become `<name>.q`, `.scale`
                                     (and `.zero`), which load_state_dict (assign=True) then fills
    quantizable_linears(model) -> [names]   the projections worth quantizing: attention, dense and shared-
                                     expert MLPs, the LM head; never a router (routing stays exact)
    quantize_dense_weights(model)    a float model's projections quantized in place (`--dense-quant q8`)
Biases stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from hotexperts.kernels.qlinear import qlinear
from hotexperts.quant import quantize_int8g
from hotexperts.weights import QuantizedWeight

GROUPS = {"int8g32": 32, "int8g16": 16}
ROUTER_SUFFIXES = (".gate", ".shared_expert_gate")          # MoE routers: kept exact


class QuantLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, fmt: str = "int8g32", *, bias: bool = False,
                 zero: bool = False, device=None, dtype=torch.bfloat16):
        super().__init__()
        if fmt not in GROUPS or in_features % GROUPS[fmt]:
            raise ValueError(f"QuantLinear: format {fmt!r} needs in_features divisible by its group")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        g = in_features // GROUPS[fmt]
        self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, g, dtype=torch.float16, device=device))
        if zero:
            self.register_buffer("zero", torch.empty(out_features, g, dtype=torch.float16, device=device))
        else:
            self.zero = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self.q, self.scale, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qlinear(x.reshape(-1, self.in_features), self.weight, self.bias)       # [T, N]
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


def quantizable_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith(ROUTER_SUFFIXES)]


def quantize_linears(model: nn.Module, names, fmt: str = "int8g32", zero: bool = False) -> nn.Module:
    """Replace the named nn.Linear modules with empty QuantLinears of the same shape (see module doc)."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, attr)
        setattr(owner, attr, QuantLinear(lin.out_features, lin.in_features, fmt, bias=lin.bias is not None,
                                         zero=zero, device=lin.weight.device, dtype=lin.weight.dtype))
    return model


def fused_rows(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose rows are `parts`' rows in order (their buffers become views of it)."""
    first = parts[0]
    out = QuantLinear(sum(p.out_features for p in parts), first.in_features, first.fmt,
                      bias=first.bias is not None, zero=first.zero is not None, device="meta")
    sizes = [p.out_features for p in parts]
    names = ["q", "scale"] + (["zero"] if first.zero is not None else [])
    with torch.no_grad():
        for name in names:
            whole = torch.cat([getattr(p, name) for p in parts])
            setattr(out, name, whole)
            for p, view in zip(parts, whole.split(sizes), strict=True):
                setattr(p, name, view)
        if first.bias is not None:
            out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return out


def quantize_dense_weights(model: nn.Module, fmt: str = "int8g32") -> list[str]:
    """Every quantizable float projection of a built model quantized to `fmt` in place (int8 with one fp16
    scale per group: the Q8_0 layout), on its device; -> the names quantized. Not exact: the error is
    Q8_0's (~0.2% of a weight's group range)."""
    done = []
    for name in quantizable_linears(model):
        lin = model.get_submodule(name)
        if lin.in_features % GROUPS[fmt]:
            continue
        qw = quantize_int8g(lin.weight.detach(), GROUPS[fmt])
        quantize_linears(model, [name], fmt)
        q = model.get_submodule(name)
        q.q, q.scale = qw.q.to(lin.weight.device), qw.scale.to(lin.weight.device)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        done.append(name)
    return done
