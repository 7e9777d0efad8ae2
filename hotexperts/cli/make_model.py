"""`hotexperts make-model`: write a preset (seeded random weights, no download) as a Hugging Face directory or
a GGUF file. The flags only; the writing is engine/presets.py's `run`.

    hotexperts make-model --preset NAME --out DIR|FILE.gguf [--format hf|gguf] [--dtype bf16] [--seed N]
"""

from __future__ import annotations

from hotexperts.cli.flags import HelpFormatter, add_device_argument, add_dtype_argument, add_seed_argument
from hotexperts.engine.gguf_export import DENSE, QUANTS
from hotexperts.engine.presets import PRESETS, run

GGUF_EXPERT_TYPES = " ".join(["q4_k", "q4_k_m", *(q for q in QUANTS if q != "q4_k")])   # write_gguf takes


def description() -> str:
    lines = "\n".join(f"  {name:<24} {p.description}" for name, p in PRESETS.items())
    return ("Write a preset model with seeded random weights (no download) as a Hugging Face directory or a "
            "GGUF file,\nfor tests and demos; `--model preset:NAME` builds the same model in memory.\n\n"
            f"presets:\n{lines}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("make-model", help="write a preset model with random weights (HF dir or GGUF)",
                              description=description(), formatter_class=HelpFormatter)
    p.add_argument("--preset", required=True, metavar="NAME", help="preset name (listed above)")
    p.add_argument("--out", required=True, metavar="DIR|FILE.gguf", help="output directory (or .gguf file)")
    add_seed_argument(p, "the random weights")
    add_dtype_argument(p)
    add_device_argument(p, help="where the random numbers are drawn (default: cuda when present)")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a safetensors directory; gguf: a GGUF file (--out FILE.gguf or DIR)")
    p.add_argument("--dense", default="q8_0", choices=DENSE,
                   help="GGUF type of the dense weights (q8_0: what llama.cpp users keep on the GPU)")
    p.add_argument("--quant", default="q4_k", metavar="TYPE",
                   help=f"GGUF expert type: {GGUF_EXPERT_TYPES} (q4_k_m: Q6_K down matrices in some layers, "
                        "as llama.cpp's Q4_K_M)")
    p.set_defaults(func=run)
