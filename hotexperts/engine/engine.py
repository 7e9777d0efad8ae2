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
dense weights, the KV cache and `workspace_bytes` as `reserved_bytes`, at the prompt chunk
`plan_prefill_chunk` picks (a tight budget halves it so that prompt staging fits).
max_context None = min(the model's max_position_embeddings, DEFAULT_MAX_CONTEXT). Stop ids = config EOS
ids + tokenizer EOS ids + generation_config EOS ids + params.stop_token_ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.engine import runner
from hotexperts.engine.batch import BatchDecoder
from hotexperts.engine.generate import Generator
from hotexperts.engine.load import load_model, parse_dtype
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.memcheck import check_before_load
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.engine.speculative import SpecConfig
from hotexperts.errors import HotExpertsError, PlacementError
from hotexperts.experts.build import build_executor, plan_placement
from hotexperts.experts.placement import Placement
from hotexperts.kernels.deltanet import chunk_workspace_bytes
from hotexperts.models.cache import MAX_SLOTS, cache_bytes
from hotexperts.models.qlinear import quantize_dense_weights

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
                       parallel: int = 1):
    """-> (prompt chunk, reserved parts at it, the store in the placement's format): the generator's chunk
    (at most max_context), or under a VRAM budget the one `pick_prefill_chunk` picks (parallel: the KV
    cache's sequence slots)."""
    chunk = min(Generator.prefill_chunk, max_context)
    parts = vram_reserved(loaded, max_context, dtype, device, chunk, parallel)
    p = placement if placement is not None else Placement()
    if p.vram_budget is None:
        return chunk, parts, loaded.store
    held = {"store": loaded.store}

    def plan_at(c: int):
        reserved = {**parts, "workspace": workspace_bytes(loaded.cfg, dtype, c, max_context)}
        plan, held["store"] = plan_placement(p, held["store"], device, sum(reserved.values()), reserved,
                                             dtype)
        return plan, reserved

    chunk, (_, parts) = pick_prefill_chunk(chunk, plan_at)
    return chunk, parts, held["store"]


def pick_prefill_chunk(chunk: int, plan_at):
    """The prompt chunk for a budget: `chunk`, or under a budget too tight for prompt staging the first of
    its halves down to MIN_PREFILL_CHUNK whose smaller workspace leaves the pools room (prompt batches then
    run on the GPU, not the hybrid path); failing that the first chunk that plans at all. plan_at(chunk) ->
    (PlacementPlan, anything) or PlacementError. -> (chunk, plan_at's result); the first error when none
    plans."""
    planned, error = [], None
    while True:
        try:
            got = plan_at(chunk)
            planned.append((chunk, got))
            if not got[0].staging.tight:
                return chunk, got
        except PlacementError as e:
            error = error or e
        if chunk // 2 < MIN_PREFILL_CHUNK:
            break
        chunk //= 2
    if not planned:
        raise error
    return planned[0]


def default_executor(placement, store, cfg, device: torch.device, dtype: torch.dtype, reserved: dict,
                     kernel_options: KernelOptions | None = None):
    """build_executor(placement or Placement(), ...) with the kernel options (default: KernelOptions()) and
    the VRAM already spoken for (vram_reserved)."""
    return build_executor(placement if placement is not None else Placement(), store, cfg, device,
                          reserved_bytes=sum(reserved.values()), reserved_parts=reserved, dtype=dtype,
                          options=kernel_options if kernel_options is not None else DEFAULT_KERNELS)


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
        if executor is None:                          # RAM / VRAM need vs available, before any allocation
            check_before_load(str(source), dt, dev, placement, max_context=max_context,
                              default_context=DEFAULT_MAX_CONTEXT)
        loaded = load_source(str(source), dt, dev, seed, host_embedding, dense_quant)
        return cls.from_loaded(loaded, dev, placement, max_context=max_context, use_cuda_graph=use_cuda_graph,
                               executor=executor, piecewise_graph=piecewise_graph,
                               compile_decode=compile_decode, kernel_options=kernel_options,
                               speculative=speculative, parallel=parallel)

    @classmethod
    def from_loaded(cls, loaded, device: torch.device, placement=None, *, max_context: int | None = None,
                    use_cuda_graph: bool = True, executor=None, piecewise_graph: bool = False,
                    compile_decode: bool = False, kernel_options: KernelOptions | None = None,
                    wrap_executor=None, speculative: SpecConfig | None = None, parallel: int = 1) -> Engine:
        """An engine over an already loaded model (the bench builds one per placement over one model).
        wrap_executor: executor -> executor applied to the built one (the bench's routing replay).
        parallel: sequence slots of the batch decoder (1: none, the one-request path only)."""
        check_parallel(parallel)
        cfg, dt = loaded.cfg, next(loaded.model.parameters()).dtype
        ctx = max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if ctx < 1 or ctx > cfg.max_position_embeddings:
            raise HotExpertsError(f"max_context must be in [1, {cfg.max_position_embeddings}], got {ctx}")
        chunk = None
        if executor is None:
            chunk, parts, store = plan_prefill_chunk(loaded, placement, ctx, dt, device, parallel)
            executor = default_executor(placement, store, cfg, device, dt, parts, kernel_options)
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


# The caching allocator's slack beyond live tensors: it rounds blocks of 1 MiB and more up to 2 MiB and keeps
# small tensors in 2 MiB segments, and a freed block serves a later request only if that one fits in it.
# Not cut below 128 MiB: run 20 (docs/benchmarks.md) measured our process 0.2-0.3 GiB over the budget with
# it; the bench prints the measured slack (torch's reserved peak - allocated peak) and the context after the
# tests per placement, which say which of the two to change.
ALLOCATOR_SLACK = 128 * 2**20


def vram_reserved(loaded, max_context: int, dtype: torch.dtype, device: torch.device,
                  chunk: int | None = None, parallel: int = 1) -> dict:
    """The GPU memory the process holds before any expert slot: {context, dense, kv, workspace} bytes
    (the dequantize chunk of quantized experts is the plan's, experts/solve.py). chunk: the prompt chunk
    the run uses (None: the generator's, at most max_context); parallel: the batch decoder's sequence slots
    (the KV cache holds that many). context (CUDA only) = cuda_context_bytes."""
    chunk = min(chunk or Generator.prefill_chunk, max_context)
    parts = {"dense": dense_bytes(loaded.model), "kv": kv_bytes(loaded.cfg, max_context, dtype, parallel),
             "workspace": workspace_bytes(loaded.cfg, dtype, chunk, max_context)}
    if device.type == "cuda":
        return {"context": cuda_context_bytes(device, dtype), **parts}
    return parts


def cuda_context_bytes(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> int:
    """What the process holds on the device beyond our tensors, measured: the device's used memory that
    torch's allocator does not hold (CUDA context, loaded kernel modules; on a card shared with other
    programs their memory too, so the engine stays within what is left), plus the cuBLAS / cuBLASLt
    workspaces torch keeps allocated once a matmul ran (one small matmul and addmm are run first, so the
    handles exist). Kernels loaded later (Triton, the first CUDA graph) are not in it: the bench prints the
    context measured again after each placement (bench/harness.py)."""
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
    (the dequantize chunk of quantized experts aside: the plan's): the residual stream and norms (12 fp32
    [T, D]), q/k/v and their roped copy, the attention scores of SDPA's math fallback ([H, T, S] fp32 +
    two copies in the dtype, and K, V repeated to H heads for GQA; the fused backends need none), the
    largest dense projection dequantized for
    a prompt (kernels/qlinear), the MoE pass's per-pair buffers, router logits, a DeltaNet layer's chunked
    temporaries, last-token logits, and the allocator's slack."""
    a, T, S = dtype.itemsize, chunk, max_context
    D, K, I, E = cfg.hidden_size, cfg.top_k, cfg.moe_intermediate_size, cfg.num_experts
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hidden = T * D * 4 * 12
    scores = H * T * S * (4 + 2 * a) + (2 * H * S * hd * a if H != Hkv else 0)     # + GQA's repeated K, V
    attention = T * (H + 2 * Hkv) * hd * a * 3 + scores
    widest = max((H + 2 * Hkv) * hd, 2 * cfg.intermediate_size, 2 * cfg.shared_expert_intermediate_size)
    dense = widest * D * a
    moe = T * K * I * a * 3 + T * K * D * 4 + T * E * 4
    act = hidden + attention + dense + moe + cfg.vocab_size * 8
    if cfg.linear_layers:                          # a Gated DeltaNet layer's chunked form (and its q|k|v|z)
        s = cfg.linear
        act += chunk_workspace_bytes(T, s.num_value_heads, s.key_head_dim, s.value_head_dim)
        act += T * (s.conv_dim + s.num_value_heads * s.value_head_dim) * a * 3
    return act + ALLOCATOR_SLACK
