"""Continuous batching: N sequence slots, one decode step for every running sequence at once.

    batch = BatchDecoder(model, executor, cfg, device, max_context, num_slots=N)
    seq = batch.add(prompt_ids, params, stop_ids)     # a free slot, batch-1 prefill into it, first token
    seq.token         the token this sequence produced in the latest add()/step() (None: none to hand out)
    seq.finish_reason None while running, then "stop" | "length" (or "cancelled" after release)
    batch.step()      one forward of B <= N tokens: every running sequence's last token at its own position
    batch.release(seq)                                 # frees the slot (finished, cancelled or timed out)
    batch.running     the sequences still decoding; batch.free_slots

Shapes in a step of B rows (B = running sequences, N = slots, S = max_context positions per slot):
    tokens, slots, positions   [B] int64      row b: its last token, its slot, the position it is written at
    K/V of an attention layer  [Hkv, N*S, hd] one flat key axis (models/cache.SlotKVCache): row b writes at
                               slots[b]*S + positions[b] and its additive bias [B*G, N*S] opens only its own
                               slot's positions <= positions[b], so the grouped attention of the T-token
                               decode path (models/layers.grouped_attention) serves every row at once
    linear-attention layers    conv [N, C, Kc-1], state [N, Hv, dk, dv]: each row's mixer runs over its own
                               slot's state (a loop over the B rows, the recurrent T=1 step of each)
    the MoE                    executor(layer, x [B, D], ids [B, K], weights [B, K]) after before_step(): a
                               T-token decode step over the union of the rows' experts, the same executor
                               and placement code paths as the speculative verify step (engine/runner/verify)
Every row samples with its own sampling.Sampler (penalties over its own tokens, its own seed), stops on its
own stop ids (not handed out) or after its own max_tokens, exactly as Generator does for one request.

The batched step runs eagerly (no CUDA graph; the one-request T=1 graph path is Generator's, unchanged).
Numerics: the same kernels as a one-request decode step; the only differences are the rounding of GEMMs whose
blocking depends on B and the attention reductions over N*S columns instead of S (the extra columns have
weight exactly 0): ~1e-6 relative in float32, greedy tokens of the tiny models identical (tests/engine).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from hotexperts.config import ModelConfig
from hotexperts.engine.generate import prefill
from hotexperts.engine.sampling import Sampler, SamplingParams, make_generator
from hotexperts.errors import ContextLengthError, HotExpertsError
from hotexperts.models.cache import MAX_SLOTS, SlotKVCache
from hotexperts.models.layers import decode_bias


@dataclass(eq=False)
class Sequence:
    """One request's decoding state in its slot."""
    slot: int
    prompt_len: int
    sampler: Sampler
    stops: frozenset[int]
    max_tokens: int
    pos: int = 0                          # position the next forward writes (= tokens in the slot so far)
    generated: int = 0                    # tokens sampled (stop ids included)
    token: int | None = None              # the latest produced token to hand out, None when none
    tokens: list[int] = field(default_factory=list)     # every token handed out
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, token: int) -> None:
        """Account a sampled token: hand it out unless it is a stop id; finish on stop or max_tokens."""
        self.generated += 1
        if token in self.stops:
            self.token, self.finish_reason = None, "stop"
            return
        self.token = token
        self.tokens.append(token)
        if self.generated >= self.max_tokens:
            self.finish_reason = "length"


@dataclass
class BatchTimings:
    steps: int = 0                        # batched decode forwards
    rows: int = 0                         # tokens they computed (sum of B)
    seconds: float = 0.0
    prefills: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        return d | {"mean_batch": self.rows / self.steps if self.steps else 0.0,
                    "decode_tok_per_s": self.rows / self.seconds if self.seconds > 0 else 0.0}


class BatchDecoder:
    prefill_chunk = 512

    def __init__(self, model, executor, cfg: ModelConfig, device: torch.device | str, max_context: int,
                 num_slots: int, *, dtype: torch.dtype | None = None):
        if not 1 <= num_slots <= MAX_SLOTS:
            raise HotExpertsError(f"--parallel must be in 1..{MAX_SLOTS} (decode-sized batches), "
                                  f"got {num_slots}")
        self.model, self.executor, self.cfg = model, executor, cfg
        self.device, self.max_context = torch.device(device), int(max_context)
        dtype = dtype or model.model.norm.weight.dtype
        self.cache = SlotKVCache(cfg, num_slots, self.max_context, dtype, self.device)
        self.slot_views = [self.cache.slot(s) for s in range(num_slots)]
        self.free_slots: list[int] = list(range(num_slots))
        self.running: list[Sequence] = []
        self.timings = BatchTimings()

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    # -- admission -------------------------------------------------------------------------------
    def check_fits(self, n_prompt: int, params: SamplingParams) -> None:
        if n_prompt == 0:
            raise HotExpertsError("the prompt is empty (0 tokens)")
        if n_prompt + params.max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = "
                f"{n_prompt + params.max_tokens} tokens exceeds the context of {self.max_context} tokens "
                f"per slot; shorten the prompt or lower max_tokens")

    def add(self, prompt_ids: list[int], params: SamplingParams, stop_ids: Iterable[int] = (), *,
            ignore_eos: bool = False) -> Sequence:
        """Admit a request into a free slot: prefill it there (batch-1) and sample its first token.
        ignore_eos: the model's EOS ids do not stop it (the bench's fixed-length runs)."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_fits(len(prompt_ids), params)
        if not self.free_slots:
            raise HotExpertsError(f"all {self.num_slots} slots are busy; release a sequence first")
        eos = frozenset() if ignore_eos else frozenset(self.cfg.eos_token_ids)
        stops = eos | frozenset(params.stop_token_ids) | frozenset(stop_ids)
        sampler = Sampler(params, make_generator(params, self.device), prompt_ids)
        seq = Sequence(self.free_slots.pop(0), len(prompt_ids), sampler, stops, params.max_tokens,
                       pos=len(prompt_ids))
        try:
            t0 = time.perf_counter()
            logits = prefill(self.model, self.executor, self.slot_views[seq.slot], prompt_ids, self.device,
                             self.prefill_chunk)
            seq.take(sampler(logits.float()))
            self.executor.check_errors()
        except BaseException:
            self.free_slots.append(seq.slot)
            raise
        t = self.timings
        t.prefills, t.prefill_tokens = t.prefills + 1, t.prefill_tokens + len(prompt_ids)
        t.prefill_seconds += time.perf_counter() - t0
        if not seq.finished:
            self.running.append(seq)
        else:
            self.free_slots.append(seq.slot)
        return seq

    def release(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop `seq` while it runs (finish_reason `reason`, nothing more to hand out) and free its slot.
        A finished sequence has freed its slot already. Idempotent."""
        if seq in self.running:
            seq.finish_reason, seq.token = reason, None
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free_slots.append(seq.slot)

    # -- the batched step --------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One decode forward of every running sequence's latest token; each samples its next one. Returns
        the sequences stepped (finished ones leave `running` and free their slots)."""
        rows = list(self.running)
        if not rows:
            return []
        t0 = time.perf_counter()
        dev = self.device
        tokens = torch.tensor([s.tokens[-1] for s in rows], dtype=torch.long, device=dev)       # [B]
        slots = [s.slot for s in rows]
        positions = torch.tensor([s.pos for s in rows], dtype=torch.long, device=dev)            # [B]
        self.executor.before_step()                    # a B-token decode step, not a prompt chunk
        with torch.no_grad():
            logits = self.forward(tokens, slots, positions).float()                             # [B, V]
        self.executor.end_step()
        self.executor.check_errors()
        for seq, row in zip(rows, logits, strict=True):
            seq.pos += 1
            seq.take(seq.sampler(row))
            if seq.finished:                           # its last token is still handed out
                self._free(seq)
        t = self.timings
        t.steps, t.rows, t.seconds = t.steps + 1, t.rows + len(rows), t.seconds + time.perf_counter() - t0
        return rows

    def forward(self, tokens: torch.Tensor, slots: list[int], positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B], the rows' slots (host ints) -> logits [B, V]: the model's decode pieces
        (embedding, rope, per layer pre_experts -> executor, head) over the slot cache."""
        model, cache, executor = self.model, self.cache, self.executor
        host_slots, slots = slots, torch.tensor(slots, dtype=torch.long, device=positions.device)  # [B]
        x = model.model.embed_tokens(tokens)                                                     # [B, D]
        rope = model.rotary(positions, x.dtype)                                                  # [B, r]
        mask = self._bias(slots, positions, x.dtype)                                             # [B*G, N*S]
        index = cache.index(slots, positions)                                                    # [B]
        for layer in model.model.layers:
            if layer.linear:
                h, a, ids, w = self._linear_rows(layer, x, rope, positions, host_slots)
            else:
                h, a, ids, w = layer.pre_experts(x, rope, index, *cache.layer(layer.layer), mask)
            x = h + (a if ids is None else executor(layer.layer, a, ids, w))
        return model.head(x)

    def _bias(self, slots: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The decode bias [B*G, N*S] ([2, ...] full and sliding with mixed windows), as model.prepare."""
        cfg, cache = self.cfg, self.cache
        if cfg.mixed_windows:
            mask = torch.stack((cache.mask(slots, positions),
                                cache.mask(slots, positions, cfg.sliding_window)))
        else:
            mask = cache.mask(slots, positions, cfg.sliding_window)
        return decode_bias(mask, cfg.num_heads // cfg.num_kv_heads, dtype)

    def _linear_rows(self, layer, x, rope, positions, slots):
        """A linear-attention layer row by row, each over its own slot's conv and recurrent state, then the
        rows' (h, a, ids, weights) stacked for one executor call."""
        conv, state = self.cache.layer(layer.layer)                                              # [N, ...]
        parts = [layer.pre_experts(x[b:b + 1], rope, positions[b:b + 1], conv[s], state[s], None)
                 for b, s in enumerate(slots)]
        h, a, ids, w = zip(*parts, strict=True)
        if ids[0] is None:
            return torch.cat(h), torch.cat(a), None, None
        return torch.cat(h), torch.cat(a), torch.cat(ids), torch.cat(w)

    def stats(self) -> dict:
        return {"slots": self.num_slots, "running": len(self.running), **self.timings.as_dict()}
