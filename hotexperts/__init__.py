"""hotexperts: run Mixture-of-Experts LLMs larger than VRAM with a hot-expert cache.

Import flow (one way, checked by import-linter: pyproject.toml, docs/architecture.md): errors -> formats ->
{weights, config} -> {executor, quant, tokenizer} -> {kernels | loading} -> {experts | models} ->
{engine | trace} -> {bench | server} -> cli; parts beside each other (`|`) never import each other.
"""

__version__ = "0.1.0"
