"""The T=1 decode step in stages, optionally through torch.compile (Inductor), one graph for many layers.

    stages = DecodeStages(compile=True)              # or engine/runner/compiled.compile_decode(model)
    logits = stages.run(model, tok[1], pos[1], kv, executor)   # None: compiling failed (warned)
    stages.stats()                                   # graphs compiled per stage, Inductor seconds, ...

A decode step is prepare -> per layer: the layer stage, then (MoE layers) the executor -> head. x is the
residual stream and y what the previous layer adds to it; y is added at the start of the next stage, so the
residual add after the executor runs inside a compiled graph instead of as one more launch:

    prepare(model, tok, pos, kv)                 -> x = embed(tok), y = 0, rope (cos, signed sin), decode bias
    layer(layer, x, y, rope, pos, kc, vc, bias)  -> layer.pre_experts(x + y, ...): input norm, q/k/v, q/k
                                                    norm, RoPE, K/V write, grouped attention, o_proj,
                                                    residual, post norm, router, shared expert:
                                                    (h, xn, ids, w) MoE | (h, mlp(xn), None, None) dense
    y = executor(l, xn, ids, w)                  eager, outside every compiled graph (any executor: a hybrid
                                                 one may read pinned host memory or sync with the host)
    head(model, x, y)                            -> lm_head(norm(x + y)) [1, V] float32

The layer stage is handed its own cache views kc, vc, never its index, so Dynamo sees the same module
structure and shapes in every layer; parameters are graph inputs (inline_inbuilt_nn_modules, the default
since torch 2.5), not guarded by identity. All MoE layers share one graph, dense layers (qwen3 mlp_only,
qwen2 decoder_sparse_step) a second. Stages compile with fullgraph=True, dynamic=False and without Inductor's
own CUDA graphs: the runner captures the whole step itself (runner/cuda_graph.py, runner/piecewise.py), and
a compile that starts during a capture raises (the steps compile in a warm-up pass first). Inductor writes
the new K/V entry in place (the cache is a mutated graph input, not copied). A new KV cache length or dtype
compiles again (the shapes are static); Dynamo's recompile limit (8 per stage function, per process) then
fails loudly (fullgraph). Uncompiled, the same stages run eagerly: the piecewise step always uses them.
Prefill (T > 1) and any forward with autograd on never come here.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter

import torch

from hotexperts.errors import HotExpertsError

UNSAFE_MODES = ("reduce-overhead", "max-autotune")      # Inductor CUDA graphs: the engine captures its own


def prepare_stage(model, tokens: torch.Tensor, input_pos: torch.Tensor, kv):
    """-> x [1, D], y = 0 [1, D], rope (cos, signed sin) [1, hd], decode bias [G, S]."""
    x, rope, bias = model.prepare(tokens, input_pos, kv)
    return x, torch.zeros_like(x), rope, bias


def layer_stage(layer, x, y, rope, input_pos, kc, vc, bias):
    """x + y -> DecoderLayer.pre_experts: (h, xn, ids, w) for MoE layers, (h, mlp(xn), None, None) dense."""
    return layer.pre_experts(x + y, rope, input_pos, kc, vc, bias)


def head_stage(model, x, y):
    return model.head(x + y)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class DecodeStages:
    """The three decode stages, compiled (`compile=True`) or plain, and the loop that runs them.

    backend: "inductor" (mode / options as torch.compile's), or any other Dynamo backend name or callable
    (tests: "aot_eager")."""

    def __init__(self, compile: bool = False, *, backend="inductor", mode: str | None = None,
                 options: dict | None = None):
        if mode in UNSAFE_MODES:
            raise ValueError(f"mode {mode!r} adds Inductor CUDA graphs; the engine captures the decode step "
                             f"itself: use None or 'max-autotune-no-cudagraphs'")
        self.compiled, self.backend, self.mode = bool(compile), backend, mode
        self.options = dict(options or {})
        self.settings = (self.compiled, backend, mode, tuple(sorted(self.options.items())))
        self.graphs: Counter = Counter()             # graphs compiled per stage (recompiles = graphs - kinds)
        self.compile_seconds: Counter = Counter()    # backend (Inductor) seconds per stage
        self.first_step_seconds: float | None = None  # the first compiled step: Dynamo + Inductor + run
        self.ready = not self.compiled               # a compiled step has run through once
        self.failed = False                          # compiling failed: the model decodes eagerly
        if not self.compiled:
            self.prepare, self.layer, self.head = prepare_stage, layer_stage, head_stage
            return
        inner = self._inner_backend()
        kw = dict(fullgraph=True, dynamic=False)
        self.prepare = torch.compile(prepare_stage, backend=self._counting("prepare", inner), **kw)
        self.layer = torch.compile(layer_stage, backend=self._counting("layer", inner), **kw)
        self.head = torch.compile(head_stage, backend=self._counting("head", inner), **kw)

    # ---- compiling --------------------------------------------------------------------------------------
    def _inner_backend(self):
        if self.backend != "inductor":
            return torch._dynamo.lookup_backend(self.backend)
        options = {**self.options, "triton.cudagraphs": False}
        wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)   # what torch.compile builds itself
        if wrapper is not None:
            return wrapper(self.mode, options, False)                    # validates option names and types
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**(list_mode_options(self.mode) if self.mode not in (None, "default") else {}), **options}
        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)

    def _counting(self, stage: str, inner):
        def compile_stage(gm, example_inputs):
            if capturing():
                raise RuntimeError(f"torch.compile of the decode {stage} stage started during CUDA graph "
                                   f"capture (a guard failed after warm-up)")
            t0 = time.perf_counter()
            fn = inner(gm, example_inputs)
            self.graphs[stage] += 1
            self.compile_seconds[stage] += time.perf_counter() - t0
            return fn
        return compile_stage

    # ---- running ----------------------------------------------------------------------------------------
    def applies(self, tokens: torch.Tensor) -> bool:
        """A T=1 decode step without autograd (T > 1 and a forward with autograd on stay eager)."""
        return (not self.failed and tokens.shape[0] == 1 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def forward(self, model, tokens, input_pos, kv, executor) -> torch.Tensor:
        """tokens, input_pos [1] -> logits [1, V] float32 (the same as MoETransformer.forward over the whole
        static cache)."""
        x, y, rope, bias = self.prepare(model, tokens, input_pos, kv)
        for layer in model.model.layers:
            h, a, ids, w = self.layer(layer, x, y, rope, input_pos, *kv.layer(layer.layer), bias)
            x, y = h, (a if ids is None else executor(layer.layer, a, ids, w))
        return self.head(model, x, y)

    def run(self, model, tokens, input_pos, kv, executor) -> torch.Tensor | None:
        """forward; the first compiled step is timed, and if compiling fails (not during a capture) this
        warns, turns the stages off and returns None: the caller then runs the model's own forward."""
        if self.ready:
            return self.forward(model, tokens, input_pos, kv, executor)
        t0 = time.perf_counter()
        try:
            out = self.forward(model, tokens, input_pos, kv, executor)
        except HotExpertsError:
            raise                        # the executor's own error (a failed CPU step): not compile's
        except Exception as exc:
            if capturing():
                raise
            self.failed = True
            warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {exc}); "
                          f"decoding without it", RuntimeWarning, stacklevel=3)
            return None
        self.ready, self.first_step_seconds = True, time.perf_counter() - t0
        return out

    def warm(self, run_step) -> None:
        """Call `run_step()` (one real decode forward) if the stages still have to compile: decode steps do
        this before their CUDA-graph warm-up, so compiling (and Triton autotuning, which synchronises) never
        runs under the sync-debug warm-up or inside a capture. Run before every capture, not only the first:
        a new KV-cache length recompiles (seen on the H200: a second bench source with a shorter context)."""
        if self.compiled and not self.failed:
            run_step()

    def stats(self) -> dict:
        return {"compiled": self.compiled and not self.failed, "failed": self.failed, "backend": self.backend,
                "mode": self.mode, "options": self.options, "graphs": dict(self.graphs),
                "compile_seconds": {k: round(v, 3) for k, v in self.compile_seconds.items()},
                "first_step_seconds": self.first_step_seconds}
