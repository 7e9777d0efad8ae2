"""Engine: the one facade the CLI, the bench harness and the server use. It speaks token ids.

    engine = Engine.load("path/to/hf_dir" | "model.gguf" | "preset:tiny-qwen3-moe", dtype="bfloat16",
                         device=None, placement=Placement(...), max_context=None, kernel_options=None)
    engine = Engine.from_loaded(loaded, placement=..., ...)   # another placement over a loaded model (bench)
    engine.tokenizer, engine.config, engine.max_context
    for tok in engine.generate(prompt_ids, SamplingParams(...)):   # raises ContextLengthError at call time
        ...
    engine.finish_reason      # "stop" | "length" after a request (textstream may end it earlier: "stop")
    engine.stats()            # {"last": {...}, "total": {...}, "cache": executor stats or None, ...}

    engine.prefill(ids) -> logits [V];  engine.decode_one(token, pos) -> logits [V]   (bench: timed passes)
    engine.verify(tokens, pos) -> logits [T, V]        a T-token verify step (speculative decoding)
    Engine.load(..., parallel=N)    engine.batch: a BatchDecoder of N sequence slots (engine/batch.py, the
                              server's continuous batching); engine.generate then decodes in slot 0
    Engine.load(..., speculative=SpecConfig(method="ngram", draft_max=8))   drafting (engine/speculative.py)
    engine.close()            # stop the executor's background threads

device None = "cuda" when available, else "cpu". placement None = `Placement()` (every expert on the GPU);
the executor comes from `experts.build.build_executor` with the VRAM already taken by the CUDA context,
dense weights, the KV cache (every sequence slot), `workspace_bytes` and the step memory of the features on
(memcheck.feature_bytes: CUDA graph pools, verify steps, batched steps) as `reserved_bytes`, at the prompt
chunk `plan_prefill_chunk` picks: a smaller chunk where it makes every expert resident, else where it
lets prompt staging fit. Under a budget that holds every expert only without cuBLAS's workspace (or not at
all), `prepare_cublas_workspace` sets CUBLAS_WORKSPACE_CONFIG=:0:0 before the engine's first matmul (a value
the user set is kept: setting it yourself, to any value, is the knob). The plan's notes say what was chosen.
max_context None = min(the model's max_position_embeddings, DEFAULT_MAX_CONTEXT). Stop ids = config EOS
ids + tokenizer EOS ids + generation_config EOS ids + params.stop_token_ids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.engine import runner
from hotexperts.engine.batch import BatchDecoder
from hotexperts.engine.generate import Generator
from hotexperts.engine.load import load_model, parse_dtype
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.memcheck import (
    ALLOCATOR_SLACK,
    CUBLAS_STREAM_BYTES,
    check_before_load,
    feature_bytes,
    step_activation_bytes,
)
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.runner.verify import MAX_VERIFY_T
from hotexperts.engine.sampling import SamplingParams
from hotexperts.engine.speculative import SpecConfig
from hotexperts.errors import HotExpertsError, PlacementError
from hotexperts.experts.budget import MiB
from hotexperts.experts.build import build_executor, plan_placement
from hotexperts.experts.placement import Placement
from hotexperts.experts.solve import every_expert_resident
from hotexperts.models.cache import MAX_SLOTS, cache_bytes
from hotexperts.models.qlinear import quantize_dense_weights
from hotexperts.weights import QuantizedWeight

PRESET_PREFIX = "preset:"
DEFAULT_MAX_CONTEXT = 4096
resolve_dtype = parse_dtype      # "bfloat16" | "bf16" | "float16" | "fp16" | "float32" | "fp32" | torch.dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HotExpertsError(f"device {device!r} requested but CUDA is not available")
    return dev


DENSE_QUANT = ("auto", "q8", "none")


def load_source(source: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
                host_embedding: bool | None = None, dense_quant: str = "auto"):
    """A LoadedModel (cfg, model, store, tokenizer, generation_config) from a directory, a .gguf or
    'preset:NAME'. host_embedding (None: on CUDA): the token embedding in host memory (untied models).
    dense_quant: "auto" keeps a GGUF's quantized projections (Q8_0 & co., exact) and float ones as they are;
    "q8" also quantizes float projections to int8 per 32 (Q8_0's layout; not exact); "none" dequantizes."""
    if dense_quant not in DENSE_QUANT:
        raise HotExpertsError(f"--dense-quant must be one of {', '.join(DENSE_QUANT)}, got {dense_quant!r}")
    host = device.type == "cuda" if host_embedding is None else host_embedding
    if source.startswith(PRESET_PREFIX):
        lm = build_in_memory(source[len(PRESET_PREFIX):], dtype=dtype, device=device, seed=seed,
                             host_embedding=host)
    elif source.endswith(".gguf"):
        lm = load_gguf(source, dtype=dtype, device=device, host_embedding=host,
                       dense_quant="dequantize" if dense_quant == "none" else "keep")
    else:
        lm = load_model(source, dtype=dtype, device=device, host_embedding=host)
    if dense_quant == "q8":
        quantize_dense_weights(lm.model)
    return lm


MIN_PREFILL_CHUNK = 128        # the smallest prompt chunk a tight budget shrinks to (over pp_bypass's 64)


def plan_prefill_chunk(loaded, placement, max_context: int, dtype: torch.dtype, device: torch.device,
                       parallel: int = 1, verify_tokens: int = 0, graphs: bool = False):
    """-> (prompt chunk, reserved parts at it, the store in the placement's format, notes): the generator's
    chunk (at most max_context), or under a VRAM budget the one `pick_prefill_chunk` picks, after
    `prepare_cublas_workspace`. parallel: the KV cache's sequence slots; verify_tokens: the longest verify
    step (0: none); graphs: decode steps captured as CUDA graphs (their pools counted). notes: the plan's
    (PlacementPlan.notes)."""
    chunk = min(Generator.prefill_chunk, max_context)
    p = placement if placement is not None else Placement()
    features = {"parallel": parallel, "verify_tokens": verify_tokens, "graphs": graphs,
                "expert_quant": p.expert_quant}
    if p.vram_budget is None:
        return chunk, vram_reserved(loaded, max_context, dtype, device, chunk, **features), loaded.store, ()
    note, store = cublas_for_budget(loaded, p, max_context, dtype, device, **features)
    held = {"store": store}
    context = {"context": cuda_context_bytes(device, dtype)} if device.type == "cuda" else {}  # cuBLAS set

    def plan_at(c: int):
        reserved = {**context, **reserved_parts(loaded, max_context, dtype, device, c, **features)}
        plan, held["store"] = plan_placement(p, held["store"], device, sum(reserved.values()), reserved,
                                             dtype)
        return plan, reserved

    chunk, (plan, parts) = pick_prefill_chunk(chunk, plan_at, loaded.cfg.num_experts)
    return chunk, parts, held["store"], tuple(n for n in (*plan.notes, note) if n)


def cublas_for_budget(loaded, placement: Placement, max_context: int, dtype: torch.dtype,
                      device: torch.device, **features) -> tuple[str, object]:
    """prepare_cublas_workspace for `placement`'s VRAM budget on CUDA, the every-expert plan made with the
    context measured so far + cuBLAS's default cost (cuBLAS untouched) and the reserved parts of
    `features` (reserved_parts' keywords). -> (the plan's note, "" for none; the store in the placement's
    format). The bench calls it for its tightest budget before it measures anything."""
    if device.type != "cuda" or placement.vram_budget is None:
        return "", loaded.store
    everything = Placement(vram_budget=placement.vram_budget, expert_quant=placement.expert_quant,
                           prompt_mode=placement.prompt_mode)
    held = {"store": loaded.store}

    def plan_every_expert_at(c: int):
        reserved = {"context": cuda_context_bytes(device, dtype, warm_cublas=False),
                    **reserved_parts(loaded, max_context, dtype, device, c, **features)}
        plan, held["store"] = plan_placement(everything, held["store"], device, sum(reserved.values()),
                                             reserved, dtype)
        return plan, reserved

    return prepare_cublas_workspace(plan_every_expert_at, min(Generator.prefill_chunk, max_context)), \
        held["store"]


def pick_prefill_chunk(chunk: int, plan_at, num_experts: int):
    """The prompt chunk for a budget, among `chunk` and its halves down to MIN_PREFILL_CHUNK: where `chunk`
    leaves experts off the GPU, the largest whose smaller workspace makes EVERY expert resident (no CPU
    layer, no staging: prompts at 128-256 tokens all on the GPU beat a hybrid prefill at 512; the plan's
    notes say so); else the first whose prompt staging fits (prompt batches on the GPU, not the hybrid
    path); failing that the first that plans at all. plan_at(chunk) -> (PlacementPlan, anything) or
    PlacementError. -> (chunk, plan_at's result); the first error when none plans."""
    planned, error = [], None
    for c in _halvings(chunk):
        try:
            planned.append((c, plan_at(c)))
        except PlacementError as e:
            error = error or e
    if not planned:
        raise error
    resident = [(c, got) for c, got in planned if every_expert_resident(got[0], num_experts)]
    if resident:
        c, got = resident[0]
        if c == chunk:
            return c, got
        at_chunk = planned[0][1][0] if planned[0][0] == chunk else None
        plan = replace(got[0], notes=(*got[0].notes, _resident_note(c, chunk, at_chunk, num_experts)))
        return c, (plan, *got[1:])
    staged = [(c, got) for c, got in planned if not got[0].staging.tight]
    return (staged or planned)[0]


def _halvings(chunk: int) -> list[int]:
    """chunk, chunk // 2, ... while at least MIN_PREFILL_CHUNK (chunk itself always)."""
    out = [chunk]
    while out[-1] // 2 >= MIN_PREFILL_CHUNK:
        out.append(out[-1] // 2)
    return out


def _resident_note(chunk: int, default: int, plan_at_default, num_experts: int) -> str:
    if plan_at_default is None:
        why = "does not plan at all"
    else:
        off = num_experts * len(plan_at_default.where) - plan_at_default.num_slots(num_experts)
        cpu = len(plan_at_default.layers("cpu"))
        why = f"leaves {off} experts off the GPU" + (f" ({cpu} MoE layers on the CPU)" if cpu else "")
    return (f"prompt chunk {chunk}, not {default}: its smaller workspace makes every expert resident, "
            f"{default} {why}")


CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"       # read by torch when a stream's cuBLAS workspace is first made
CUBLAS_OFF = ":0:0"
CUBLAS_OURS = "HOTEXPERTS_CUBLAS_WORKSPACE"  # set beside it when the engine set it (not the user)
CUBLAS_OUTSIDE_BYTES = 64 * MiB              # cuBLAS's own memory outside torch at the default (run 23)


def prepare_cublas_workspace(plan_every_expert_at, chunk: int) -> str:
    """Before the engine's first matmul: set CUBLAS_WORKSPACE_CONFIG=:0:0 where the budget is tight, i.e.
    the `gpu` placement (every expert) plans at none of the prompt chunks pick_prefill_chunk tries, with
    cuBLAS's default workspace counted (plan_every_expert_at(chunk) -> (plan, parts) or PlacementError).
    Run 23 (docs/benchmarks.md) measured :0:0 saving 64 MiB outside torch and 32 MiB in it per stream
    (a whole Engine: 192 MiB); the context measured after it counts the saving. Read once per process: a
    value already there (the user's, or this engine's for an earlier budget) is kept. -> the plan's note
    ("" when the default stays)."""
    current = os.environ.get(CUBLAS_ENV)
    if current is not None:
        who = "hotexperts, for a tight budget earlier in this process" \
            if os.environ.get(CUBLAS_OURS) == current else "the user"
        return f"cuBLAS workspace {CUBLAS_ENV}={current} (set by {who})"
    for c in _halvings(chunk):
        try:
            plan_every_expert_at(c)
            return ""
        except PlacementError:
            continue
    os.environ[CUBLAS_ENV] = os.environ[CUBLAS_OURS] = CUBLAS_OFF
    saved = (CUBLAS_OUTSIDE_BYTES + CUBLAS_STREAM_BYTES) // MiB
    return (f"cuBLAS workspace off ({CUBLAS_ENV}={CUBLAS_OFF}: with the default one the budget does not "
            f"hold every expert; saves up to {saved} MiB of context and {CUBLAS_STREAM_BYTES // MiB} MiB "
            f"per graph stream)")


def cublas_stream_bytes() -> int:
    """One stream's cuBLAS workspace in torch's allocator as CUBLAS_WORKSPACE_CONFIG says (":KiB:COUNT"
    pairs; unset: torch's default, CUBLAS_STREAM_BYTES)."""
    value = os.environ.get(CUBLAS_ENV)
    if value is None:
        return CUBLAS_STREAM_BYTES
    try:
        fields = [int(f) for f in value.split(":")[1:]]
    except ValueError:
        return CUBLAS_STREAM_BYTES                  # torch ignores what it cannot read: its default
    return sum(size * count for size, count in zip(fields[::2], fields[1::2], strict=False)) * 1024


def default_executor(placement, store, cfg, device: torch.device, dtype: torch.dtype, reserved: dict,
                     kernel_options: KernelOptions | None = None):
    """build_executor(placement or Placement(), ...) with the kernel options (default: KernelOptions()) and
    the VRAM already spoken for (vram_reserved)."""
    return build_executor(placement if placement is not None else Placement(), store, cfg, device,
                          reserved_bytes=sum(reserved.values()), reserved_parts=reserved, dtype=dtype,
                          options=kernel_options if kernel_options is not None else DEFAULT_KERNELS)


def verify_tokens_of(speculative: SpecConfig | None) -> int:
    """The longest verify step drafting runs (draft_max + 1, at most MAX_VERIFY_T); 0 without drafting."""
    if speculative is None or speculative.method == "none":
        return 0
    return min(speculative.draft_max + 1, MAX_VERIFY_T)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class Engine:
    def __init__(self, loaded, executor, device: torch.device, max_context: int, *,
                 use_cuda_graph: bool = True, piecewise_graph: bool = False, compile_decode: bool = False,
                 speculative: SpecConfig | None = None, parallel: int = 1,
                 prefill_chunk: int | None = None):
        self.loaded, self.executor, self.device = loaded, executor, device
        self.config, self.tokenizer, self.model = loaded.cfg, loaded.tokenizer, loaded.model
        self.max_context, self.parallel = max_context, parallel
        self.batch = BatchDecoder(self.model, executor, self.config, device, max_context, parallel) \
            if parallel > 1 else None
        self.generator = Generator(self.model, executor, self.config, device, max_context,
                                   use_cuda_graph=use_cuda_graph, piecewise_graph=piecewise_graph,
                                   compile_decode=compile_decode, speculative=speculative,
                                   kv=self.batch.slot_views[0] if self.batch is not None else None)
        if prefill_chunk:                             # the chunk the VRAM plan was made for (both paths)
            self.generator.prefill_chunk = prefill_chunk
            if self.batch is not None:
                self.batch.prefill_chunk = prefill_chunk
        self.eos_ids = self._eos_ids()

    @classmethod
    def load(cls, source: str, dtype: str | torch.dtype = "bfloat16",
             device: str | torch.device | None = None, placement=None, *, max_context: int | None = None,
             seed: int = 0, use_cuda_graph: bool = True, executor=None,
             piecewise_graph: bool = False, compile_decode: bool = False,
             kernel_options: KernelOptions | None = None, dense_quant: str = "auto",
             host_embedding: bool | None = None, speculative: SpecConfig | None = None,
             parallel: int = 1) -> Engine:
        """Load a model dir, .gguf or 'preset:NAME' and build its executor (`executor` overrides placement).
        compile_decode: torch.compile the T=1 decode step's dense part (engine/runner/compiled.py);
        dense_quant, host_embedding: load_source's; speculative: drafting (engine/speculative.py)."""
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        check_parallel(parallel)
        if executor is None:                          # RAM / VRAM need vs available, before any allocation
            check_before_load(str(source), dt, dev, placement, max_context=max_context,
                              default_context=DEFAULT_MAX_CONTEXT, parallel=parallel,
                              verify_tokens=verify_tokens_of(speculative))
        loaded = load_source(str(source), dt, dev, seed, host_embedding, dense_quant)
        return cls.from_loaded(loaded, dev, placement, max_context=max_context, use_cuda_graph=use_cuda_graph,
                               executor=executor, piecewise_graph=piecewise_graph,
                               compile_decode=compile_decode, kernel_options=kernel_options,
                               speculative=speculative, parallel=parallel)

    @classmethod
    def from_loaded(cls, loaded, device: torch.device, placement=None, *, max_context: int | None = None,
                    use_cuda_graph: bool = True, executor=None, piecewise_graph: bool = False,
                    compile_decode: bool = False, kernel_options: KernelOptions | None = None,
                    wrap_executor=None, speculative: SpecConfig | None = None, parallel: int = 1,
                    verify_tokens: int | None = None) -> Engine:
        """An engine over an already loaded model (the bench builds one per placement over one model).
        wrap_executor: executor -> executor applied to the built one (the bench's routing replay).
        parallel: sequence slots of the batch decoder (1: none, the one-request path only).
        verify_tokens: the longest verify step the VRAM plan makes room for (None: speculative's, or none;
        the bench's --verify-t passes its largest T)."""
        check_parallel(parallel)
        cfg, dt = loaded.cfg, next(loaded.model.parameters()).dtype
        ctx = max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if ctx < 1 or ctx > cfg.max_position_embeddings:
            raise HotExpertsError(f"max_context must be in [1, {cfg.max_position_embeddings}], got {ctx}")
        chunk = None
        if executor is None:
            verify = verify_tokens_of(speculative) if verify_tokens is None else verify_tokens
            chunk, parts, store, notes = plan_prefill_chunk(loaded, placement, ctx, dt, device, parallel,
                                                            verify, use_cuda_graph and device.type == "cuda")
            executor = default_executor(placement, store, cfg, device, dt, parts, kernel_options)
            if notes and executor.plan is not None:     # the plan re-solved by the build: same numbers
                executor.plan = replace(executor.plan, notes=notes)
            if wrap_executor is not None:
                executor = wrap_executor(executor)
        return cls(loaded, executor, device, ctx, use_cuda_graph=use_cuda_graph,
                   piecewise_graph=piecewise_graph, compile_decode=compile_decode, speculative=speculative,
                   parallel=parallel, prefill_chunk=chunk)

    def _eos_ids(self) -> frozenset[int]:
        ids = _ids(self.config.eos_token_ids) | _ids(getattr(self.tokenizer, "eos_ids", None))
        gen_cfg = getattr(self.loaded, "generation_config", None) or {}
        if isinstance(gen_cfg, dict):
            ids |= _ids(gen_cfg.get("eos_token_id"))
        return frozenset(ids)

    def generate(self, prompt_ids: Iterable[int], params: SamplingParams) -> Iterator[int]:
        """Token ids after the prompt; stops on EOS / stop ids (not yielded) or after params.max_tokens."""
        return self.generator.generate(list(prompt_ids), params, stop_ids=self.eos_ids)

    @property
    def token_logprobs(self) -> list[tuple]:
        """The latest request's per-token (id, logprob, top alternatives) when params.logprobs was set."""
        return self.generator.token_logprobs

    def warm_up(self, steps: int = 2) -> float:
        """A 1-token prefill and `steps` decode steps outside any request (no timings counted): compiles the
        decode step (compile_decode) and captures its CUDA graph before the first real request. The cache
        of a hybrid executor sees these few tokens. Returns seconds."""
        t0 = time.perf_counter()
        gen = self.generator
        with torch.no_grad():
            gen.prefill([0])
            for pos in range(1, 1 + min(steps, self.max_context - 1)):
                gen.decode_one(0, pos)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """The prompt's forward passes (no sampling, no timings): the last position's logits [V]."""
        return self.generator.prefill(list(prompt_ids))

    def decode_one(self, token: int, pos: int) -> torch.Tensor:
        """One T=1 decode step of `token` at `pos`: logits [V]."""
        with torch.no_grad():
            return self.generator.decode_one(token, pos)

    def verify(self, tokens: list[int], pos: int) -> torch.Tensor:
        """One T-token verify step (2..16 tokens at pos..pos+T-1, speculative decoding's): logits [T, V]."""
        with torch.no_grad():
            return self.generator.verify(list(tokens), pos)

    def close(self) -> None:
        """Stop the executor's background threads (the native CPU worker); the engine cannot run after."""
        self.executor.close()

    @property
    def finish_reason(self) -> str | None:
        return self.generator.finish_reason

    def stats(self) -> dict:
        return {
            "last": self.generator.last.as_dict(),
            "total": self.generator.total.as_dict(),
            "device": str(self.device),
            "max_context": self.max_context,
            "cuda_graph": bool(self.generator.decode_step.graphed),
            "verify_graphs": sorted(self.generator.verify_step.graphed_sizes),
            "speculative": self.generator.spec_stats(),
            "compiled_decode": None if (st := runner.compiled_stages(self.model)) is None else st.stats(),
            "cache": self.executor.stats(),
            "batch": self.batch.stats() if self.batch is not None else None,
        }


def dense_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's own parameters and buffers on its device (dense weights, not routed experts)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes(cfg, max_context: int, dtype: torch.dtype, parallel: int = 1) -> int:
    """The decode cache: K/V of attention layers, conv + recurrent state of linear ones (models/cache.py),
    for `parallel` sequence slots of max_context positions each."""
    return cache_bytes(cfg, max_context, dtype, parallel)


def check_parallel(parallel: int) -> None:
    if not isinstance(parallel, int) or not 1 <= parallel <= MAX_SLOTS:
        raise HotExpertsError(f"-np/--parallel must be an integer in 1..{MAX_SLOTS} (sequences decoded "
                              f"together in one step), got {parallel!r}")


def vram_reserved(loaded, max_context: int, dtype: torch.dtype, device: torch.device,
                  chunk: int | None = None, parallel: int = 1, verify_tokens: int = 0,
                  graphs: bool = False, expert_quant: str = "none") -> dict:
    """The GPU memory the process holds before any expert slot: {context, dense, kv, workspace} bytes
    (the dequantize chunk of quantized experts is the plan's, experts/solve.py), + the step memory of the
    features on (memcheck.feature_bytes: "graphs", "verify", "batch"). chunk: the prompt chunk the run uses
    (None: the generator's, at most max_context); parallel: the batch decoder's sequence slots (the KV cache
    holds that many); verify_tokens: the longest verify step (0: none); graphs: CUDA-graph decode steps;
    expert_quant: the placement's (quantized experts on CUDA add a dequantize chunk to a verify step's).
    context (CUDA only) = cuda_context_bytes."""
    parts = reserved_parts(loaded, max_context, dtype, device, chunk, parallel, verify_tokens, graphs,
                           expert_quant)
    if device.type == "cuda":
        return {"context": cuda_context_bytes(device, dtype), **parts}
    return parts


def reserved_parts(loaded, max_context: int, dtype: torch.dtype, device: torch.device,
                   chunk: int | None = None, parallel: int = 1, verify_tokens: int = 0,
                   graphs: bool = False, expert_quant: str = "none") -> dict:
    """vram_reserved without the context (nothing measured, cuBLAS untouched)."""
    chunk = min(chunk or Generator.prefill_chunk, max_context)
    parts = {"dense": dense_bytes(loaded.model), "kv": kv_bytes(loaded.cfg, max_context, dtype, parallel),
             "workspace": workspace_bytes(loaded.cfg, dtype, chunk, max_context)}
    quantized = device.type == "cuda" and _quantized(loaded.store, expert_quant)
    return parts | feature_bytes(loaded.cfg, dtype, max_context, parallel=parallel,
                                 verify_tokens=verify_tokens, graphs=graphs and device.type == "cuda",
                                 quantized_cuda=quantized, prompt_chunk=chunk,
                                 cublas_stream=cublas_stream_bytes())


def _quantized(store, expert_quant: str) -> bool:
    """The experts the GPU computes are quantized: already in the store, or by --expert-quant."""
    return expert_quant not in (None, "none") or isinstance(store.layer(store.layers[0]).w13, QuantizedWeight)


def cuda_context_bytes(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                       warm_cublas: bool = True) -> int:
    """What the process holds on the device beyond our tensors, measured: the device's used memory that
    torch's allocator does not hold (CUDA context, loaded kernel modules; on a card shared with other
    programs their memory too, so the engine stays within what is left), plus the cuBLAS / cuBLASLt
    workspaces torch keeps allocated once a matmul ran (one small matmul and addmm are run first, so the
    handles exist). warm_cublas False: no matmul (cuBLAS untouched, so CUBLAS_WORKSPACE_CONFIG can still be
    set) and cuBLAS's measured default cost added where that variable is unset (an estimate).
    Kernels loaded later (Triton, the first CUDA graph) are not in it: the bench prints the
    context measured again after each placement (bench/harness.py)."""
    if not warm_cublas:
        free, total = torch.cuda.mem_get_info(device)
        default = CUBLAS_OUTSIDE_BYTES + CUBLAS_STREAM_BYTES if os.environ.get(CUBLAS_ENV) is None else 0
        return max(0, total - free - torch.cuda.memory_reserved(device)) + default
    before = torch.cuda.memory_allocated(device)
    a = torch.ones(64, 64, device=device, dtype=dtype)
    torch.addmm(a, a, a)
    del a
    torch.cuda.synchronize(device)
    held = max(0, torch.cuda.memory_allocated(device) - before)
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device)) + held


def workspace_bytes(cfg, dtype: torch.dtype, chunk: int, max_context: int) -> int:
    """A bound on the transient GPU memory of one prompt chunk of `chunk` tokens over a `max_context` cache
    (memcheck.step_activation_bytes; the dequantize chunk of quantized experts aside: the plan's) and the
    regular pool's allocator slack (memcheck.ALLOCATOR_SLACK)."""
    return step_activation_bytes(cfg, dtype, chunk, max_context) + ALLOCATOR_SLACK
