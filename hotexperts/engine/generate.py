"""Generator: batch-1 prefill + decode (optionally speculative) over one static KV cache, yielding token ids.

    gen = Generator(model, executor, cfg, device, max_context)
    for tok in gen.generate(prompt_ids, SamplingParams(max_tokens=64)):   # Iterator[int]
        ...

- prefill runs the prompt in chunks of `prefill_chunk` tokens (positions 0..P-1);
- each decode step is one T=1 forward run by the engine's runner (engine/runner/: a CUDA graph replay when
  `make_decode_step` allows); compile_decode=True turns on the torch.compile'd decode step with fused q/k/v
  for this model (runner.compile_decode; compiled on the first decode step, before any graph capture),
  False turns both off, None leaves the model's as it is (e.g. runner.compile_decode(model, mode=...,
  options=...) set up by the caller);
- `executor.end_step()` is called after every forward (each prompt chunk and each decode token);
- each token is drawn by a sampling.Sampler (penalties over the tokens so far, the logprobs record
  `token_logprobs`, entry i for the i-th yielded token);
- generation stops after `max_tokens` sampled tokens or on a stop id (the model's EOS ids plus
  `params.stop_token_ids`); stop ids are not yielded. `finish_reason` is then "stop" or "length";
- with drafting on (`speculative`, engine/speculative.py) a step is either that T=1 forward or one verify
  forward of the last token and a draft of k tokens (engine/runner/verify.py, 2..16 tokens, the same kernels)
  producing 1..k+1 tokens: greedy output is plain greedy decoding's, sampling keeps each token's distribution
  (the standard acceptance rule); a hybrid model's linear-attention state is rolled back after a rejection
  (restored from a snapshot, the kept tokens recomputed); `spec_stats()` holds the counters;
- prompt + max_tokens beyond `max_context` raises ContextLengthError before any work;
- the KV cache is allocated once (or handed in: `kv`, one slot of a models/cache.SlotKVCache) and
  reused: every request overwrites positions from 0 and the causal mask over absolute positions hides
  whatever a previous request left beyond them.
Timing counters (`last` for the latest request, `total` summed) count only time spent inside the
generator (not the consumer's time between tokens). Prompt time covers prefill and the first sample
(time to first token); decode time covers the later steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hotexperts.config import ModelConfig
from hotexperts.engine import runner
from hotexperts.engine.sampling import Sampler, SamplingParams, make_generator
from hotexperts.engine.speculative import AutoSwitch, NgramDrafter, SpecConfig, SpecStats
from hotexperts.errors import ContextLengthError, HotExpertsError
from hotexperts.models.cache import restore_recurrent, snapshot_recurrent


def prefill(model, executor, kv, prompt_ids: list[int], device: torch.device, chunk: int) -> torch.Tensor:
    """The prompt at positions 0..P-1 into the one-sequence cache `kv`, `chunk` tokens per forward
    (executor.end_step() after each); returns the last position's logits [V]."""
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)            # [P]
    logits = None
    with torch.no_grad():
        for start in range(0, len(prompt_ids), chunk):
            tok = ids[start:start + chunk]                                         # [T]
            pos = torch.arange(start, start + tok.shape[0], device=device)
            logits = model(tok, pos, kv, executor, last_only=True, kv_len=start + tok.shape[0])[0]   # [V]
            executor.end_step()
    return logits


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    gen_tokens: int = 0          # tokens sampled (the first comes from prefill)
    decode_steps: int = 0        # decode forwards (T=1 steps and verify steps)
    decode_tokens: int = 0       # tokens those steps produced (= decode_steps without drafting)
    decode_seconds: float = 0.0
    requests: int = 0

    def add(self, other: Timings) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return d | {"prompt_tok_per_s": self.prompt_tps, "gen_tok_per_s": self.gen_tps}


class Generator:
    prefill_chunk = 512

    def __init__(self, model, executor, cfg: ModelConfig, device: torch.device | str, max_context: int,
                 *, dtype: torch.dtype | None = None, use_cuda_graph: bool = True,
                 piecewise_graph: bool = False, compile_decode: bool | None = None,
                 speculative: SpecConfig | None = None, kv=None):
        self.model, self.executor, self.cfg = model, executor, cfg
        if compile_decode is not None and not compile_decode:
            runner.compile_decode(model, False)
        elif compile_decode and runner.compiled_stages(model) is None:   # keep settings already chosen
            runner.compile_decode(model)
        self.device, self.max_context = torch.device(device), int(max_context)
        dtype = dtype or next(model.parameters()).dtype
        if kv is None:                                                           # per layer kind if hybrid
            kv = model.new_kv_cache(self.max_context, dtype, self.device)
        self.kv = kv        # or the caller's (engine.py: slot 0 of the batch decoder's SlotKVCache)
        self.decode_step = runner.make_decode_step(model, self.kv, executor, self.device,
                                                   use_graph=use_cuda_graph, piecewise=piecewise_graph)
        self.verify_step = runner.make_verify_step(model, self.kv, executor, self.device,
                                                   use_graph=use_cuda_graph)
        self.speculative = speculative or SpecConfig()
        self.switch = AutoSwitch(enabled=self.speculative.auto_off)
        self.spec_last, self.spec_total = SpecStats(), SpecStats()
        self.last, self.total = Timings(), Timings()
        self.finish_reason: str | None = None
        self.sampler: Sampler | None = None     # the latest request's (penalty counts, logprobs record)

    @property
    def token_logprobs(self) -> list[tuple]:
        """params.logprobs: per yielded token (id, logprob, top alternatives), see engine/sampling.py."""
        return self.sampler.logprobs if self.sampler is not None else []

    # -- forward passes -------------------------------------------------------------------------
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run the whole prompt (positions 0..P-1) in chunks; returns the last position's logits [V]."""
        return prefill(self.model, self.executor, self.kv, prompt_ids, self.device, self.prefill_chunk)

    def decode_one(self, token: int, pos: int) -> torch.Tensor:
        """One T=1 forward of `token` at position `pos`; returns logits [V]."""
        logits = self.decode_step(token, pos)
        self.executor.end_step()
        return logits

    def verify(self, tokens: list[int], pos: int) -> torch.Tensor:
        """One decode forward of 2..16 tokens at positions pos..pos+T-1 (engine/runner/verify.py), the
        same kernels as T single steps; returns logits [T, V]. A linear-attention state advances by all T
        tokens: `rollback` undoes the rejected ones."""
        logits = self.verify_step(tokens, pos)
        self.executor.end_step()
        return logits

    # -- the loop --------------------------------------------------------------------------------
    def check_fits(self, n_prompt: int, params: SamplingParams) -> None:
        if n_prompt == 0:
            raise HotExpertsError("the prompt is empty (0 tokens)")
        if n_prompt + params.max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = "
                f"{n_prompt + params.max_tokens} tokens exceeds the context of {self.max_context} tokens; "
                + (f"shorten the prompt or lower max_tokens to at most {self.max_context - n_prompt}"
                   if n_prompt < self.max_context else
                   "the prompt alone fills the context: shorten it or raise the context (--max-context)"))

    def stop_ids(self, params: SamplingParams, extra: Iterable[int] = ()) -> frozenset[int]:
        return frozenset(self.cfg.eos_token_ids) | frozenset(params.stop_token_ids) | frozenset(extra)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: Iterable[int] = ()) -> Iterator[int]:
        """Yield sampled token ids; `stop_ids` adds to the model's EOS ids and params.stop_token_ids.

        Checks run at call time (ContextLengthError is raised here, not on the first next())."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_fits(len(prompt_ids), params)
        return self._run(prompt_ids, params, self.stop_ids(params, stop_ids))

    def _run(self, prompt_ids: list[int], params: SamplingParams, stops: frozenset[int]) -> Iterator[int]:
        self.last, self.finish_reason = Timings(requests=1), None
        try:
            yield from self._loop(prompt_ids, params, stops)
            self.executor.flush()            # the last step's deferred bookkeeping (and its errors) now
        finally:
            self.total.add(self.last)

    def _loop(self, prompt_ids: list[int], params: SamplingParams, stops: frozenset[int]) -> Iterator[int]:
        self.sampler = sampler = Sampler(params, make_generator(params, self.device), prompt_ids)
        t0 = time.perf_counter()
        pending = [sampler(self.prefill(prompt_ids).float())]
        self.last.prompt_tokens, self.last.prompt_seconds = len(prompt_ids), time.perf_counter() - t0
        spec = self.speculative
        drafter = self.new_drafter(prompt_ids) if spec.enabled else None
        self.spec_last = SpecStats()
        pos = len(prompt_ids)
        try:
            while True:
                for token in pending:                # 1 token per T=1 step, 1..k+1 per verify step
                    self.last.gen_tokens += 1
                    if token in stops:
                        self.finish_reason = "stop"
                        return
                    yield token
                    if self.last.gen_tokens >= params.max_tokens:
                        self.finish_reason = "length"
                        return
                    if drafter is not None:
                        drafter.append(token)
                t0 = time.perf_counter()
                pending = self._step(pending[-1], pos, drafter, params.max_tokens - self.last.gen_tokens)
                self.executor.check_errors()         # a failed CPU expert step raises here, before its tokens
                self.last.decode_seconds += time.perf_counter() - t0
                self.last.decode_steps += 1
                self.last.decode_tokens += len(pending)
                pos += len(pending)
        finally:
            self._close_spec()

    def new_drafter(self, prompt_ids: list[int]) -> NgramDrafter:
        """The request's drafter: prompt lookup over the prompt (tests replace it with a scripted one: any
        object with append(token) and draft(k) -> list[int])."""
        spec = self.speculative
        return NgramDrafter(prompt_ids, spec.ngram_max, spec.ngram_min)

    def _step(self, token: int, pos: int, drafter: NgramDrafter | None, remaining: int) -> list[int]:
        """One decode step after `token` (at `pos`, not yet in the cache) -> the new tokens: [one] from a T=1
        step, or the accepted draft tokens and one more from a verify step (engine/speculative.py)."""
        if drafter is None:
            return [self.sampler(self.decode_one(token, pos).float())]
        t0 = time.perf_counter()
        k = min(self.speculative.draft_max, remaining - 1, self.max_context - pos - 1)
        draft = drafter.draft(k) if self.switch.allow() else []
        st = self.spec_last
        st.draft_seconds += time.perf_counter() - t0
        if len(draft) < max(1, self.speculative.draft_min):
            out = [self.sampler(self.decode_one(token, pos).float())]
            st.plain_steps += 1
            self.switch.record(False, 1, time.perf_counter() - t0)
            return out
        out = self._verify_draft(token, draft, pos)
        seconds = time.perf_counter() - t0
        st.verify_steps, st.drafted, st.accepted = st.verify_steps + 1, st.drafted + len(draft), \
            st.accepted + len(out) - 1
        st.emitted += len(out)
        st.verify_seconds += seconds
        self.switch.record(True, len(out), seconds)
        return out

    def _verify_draft(self, token: int, draft: list[int], pos: int) -> list[int]:
        """Verify [token, *draft] in one forward; the tokens of the rows up to the first rejection."""
        saved = snapshot_recurrent(self.kv)                           # a linear layer's state, to roll back
        logits = self.verify([token, *draft], pos).float()            # [k+1, V]
        out = []
        for i, row in enumerate(logits):
            if i == len(draft):
                out.append(self.sampler(row))                         # every draft token accepted: one more
                break
            tok, accepted = self.sampler.accept(row, draft[i])
            out.append(tok)
            if not accepted:
                break
        if saved and len(out) <= len(draft):                          # rejected drafts entered the state
            self.rollback(saved, [token, *out[:-1]], pos)
        return out

    def rollback(self, saved: list[torch.Tensor], kept: list[int], pos: int) -> None:
        """Restore the linear-attention states from before a verify step and recompute the kept tokens'
        forward (positions pos..pos+len(kept)-1; its logits are not used), so the states hold exactly them.
        K/V entries of rejected tokens need nothing: the next step overwrites them before any query reads."""
        t0 = time.perf_counter()
        restore_recurrent(self.kv, saved)
        with self.verify_step.union.paused():                         # not a verify step's union
            if len(kept) == 1:
                self.decode_one(kept[0], pos)
            else:
                self.verify(kept, pos)
        self.spec_last.rollbacks += 1
        self.spec_last.rollback_seconds += time.perf_counter() - t0

    def _close_spec(self) -> None:
        """The request's expert-union counts (one device read) into spec_last, then into spec_total."""
        st, union = self.spec_last, self.verify_step.union
        st.layer_calls, st.expert_cells = union.calls, union.cells
        st.distinct_experts = int(union.total.item()) if union.calls else 0
        union.calls = union.cells = 0
        union.total.zero_()
        self.spec_total.add(st)

    def spec_stats(self) -> dict:
        """engine.stats()["speculative"]: the settings, the switch, the latest request's and the summed
        counters."""
        return {"method": self.speculative.method, "draft_max": self.speculative.draft_max,
                "switch": self.switch.state, "switched_off": self.switch.switched_off,
                "last": self.spec_last.as_dict(), "total": self.spec_total.as_dict()}
