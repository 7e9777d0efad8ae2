"""hotexperts: run Mixture-of-Experts LLMs larger than VRAM with a hot-expert cache.

Import flow (one way): config -> {loading, models, experts, kernels, trace.record} -> engine
-> {bench, server, trace.simulate} -> cli.  `models/` and `experts/` never import each other.
"""

__version__ = "0.1.0"
