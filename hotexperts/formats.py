"""The expert quantization vocabulary, owned here and nowhere else (torch-free, so the placement grammar, the
solver and the cost model can import it): every format name, its block layout and its size.

    Q4K_BLOCK, Q4K_BYTES        q4_k: 256 weights in 144 bytes (GGUF Q4_K blocks)
    LUT4_BLOCKS[fmt]            (weights, bytes) per block of the 4-bit lookup formats mxfp4, iq4_nl, iq4_xs
    INT8G[fmt]                  columns per group of int8g32, int8g16
    STORE_FORMATS               every QuantizedWeight.fmt (weights.py): int8, int4g32, int8g32, int8g16, q4_k,
                                mxfp4, iq4_nl, iq4_xs
    QUANTIZE_FORMATS            what quant.quantize_layer takes: "none", "int4" (= int4g32) and STORE_FORMATS
    BYTES_PER_WEIGHT[fmt]       bytes per expert weight of a store format, scales and zeros included (int8:
                                one fp32 scale per row of ~1024)
    EXPERT_QUANT[name]          --expert-quant name -> store format (None: the model's float dtype); the
                                names are none, int8, int4, int8g, q4_k and the store name int4g32
    EXPERT_QUANT_CHOICES        the names the CLI offers (EXPERT_QUANT_HELP describes each but none)

quant.py quantizes into these formats and weights.py documents their tensors; experts/placement.py checks
--expert-quant against EXPERT_QUANT, cli/flags.py offers EXPERT_QUANT_CHOICES, trace/real_shape.py sizes real
models with BYTES_PER_WEIGHT.
"""

from __future__ import annotations

Q4K_BLOCK, Q4K_BYTES = 256, 144
LUT4_BLOCKS = {"mxfp4": (32, 17), "iq4_nl": (32, 18), "iq4_xs": (256, 136)}
INT8G = {"int8g32": 32, "int8g16": 16}

STORE_FORMATS = ("int8", "int4g32", *INT8G, "q4_k", *LUT4_BLOCKS)
QUANTIZE_FORMATS = ("none", "int8", "int4", "int4g32", *INT8G, "q4_k", *LUT4_BLOCKS)
BYTES_PER_WEIGHT = {"int8": 1.0 + 4 / 1024, "int4g32": 0.5 + 4 / 32, "int8g32": 1.0 + 2 / 32,
                    "int8g16": 1.0 + 4 / 32, "q4_k": Q4K_BYTES / Q4K_BLOCK,
                    **{fmt: size / n for fmt, (n, size) in LUT4_BLOCKS.items()}}

EXPERT_QUANT_HELP = {"int8": "per-row int8", "int4": "int4g32 (Q4_0-like)",
                     "int8g": "int8 per 32 (Q8_0-like)", "q4_k": "GGUF Q4_K blocks (4.5 bits)"}
EXPERT_QUANT_CHOICES = ("none", *EXPERT_QUANT_HELP)
EXPERT_QUANT = {"none": None, "int8": "int8", "int4": "int4g32", "int4g32": "int4g32", "int8g": "int8g32",
                "q4_k": "q4_k"}


def expert_quant_help() -> str:
    """'int8: per-row int8; int4: int4g32 (Q4_0-like); ...': --expert-quant's help, in every command."""
    return "; ".join(f"{name}: {what}" for name, what in EXPERT_QUANT_HELP.items())
