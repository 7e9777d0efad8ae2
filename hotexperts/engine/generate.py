"""Generator: batch-1 prefill + decode over one static KV cache, yielding token ids.

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
- prompt + max_tokens beyond `max_context` raises ContextLengthError before any work;
- the KV cache is allocated once and reused: every request overwrites positions from 0 and the causal
  mask over absolute positions hides whatever a previous request left beyond them.
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
from hotexperts.errors import ContextLengthError, HotExpertsError


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    gen_tokens: int = 0          # tokens sampled (the first comes from prefill)
    decode_steps: int = 0        # T=1 forwards
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
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return d | {"prompt_tok_per_s": self.prompt_tps, "gen_tok_per_s": self.gen_tps}


class Generator:
    prefill_chunk = 512

    def __init__(self, model, executor, cfg: ModelConfig, device: torch.device | str, max_context: int,
                 *, dtype: torch.dtype | None = None, use_cuda_graph: bool = True,
                 piecewise_graph: bool = False, compile_decode: bool | None = None):
        self.model, self.executor, self.cfg = model, executor, cfg
        if compile_decode is not None and not compile_decode:
            runner.compile_decode(model, False)
        elif compile_decode and runner.compiled_stages(model) is None:   # keep settings already chosen
            runner.compile_decode(model)
        self.device, self.max_context = torch.device(device), int(max_context)
        dtype = dtype or next(model.parameters()).dtype
        self.kv = model.new_kv_cache(self.max_context, dtype, self.device)      # per layer kind if hybrid
        self.decode_step = runner.make_decode_step(model, self.kv, executor, self.device,
                                                   use_graph=use_cuda_graph, piecewise=piecewise_graph)
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
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)    # [P]
        logits = None
        with torch.no_grad():
            for start in range(0, len(prompt_ids), self.prefill_chunk):
                tok = ids[start:start + self.prefill_chunk]                        # [T]
                pos = torch.arange(start, start + tok.shape[0], device=self.device)
                logits = self.model(tok, pos, self.kv, self.executor, last_only=True,
                                    kv_len=start + tok.shape[0])[0]                 # [V]
                self.executor.end_step()
        return logits

    def decode_one(self, token: int, pos: int) -> torch.Tensor:
        """One T=1 forward of `token` at position `pos`; returns logits [V]."""
        logits = self.decode_step(token, pos)
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
        token = sampler(self.prefill(prompt_ids).float())
        self.last.prompt_tokens, self.last.prompt_seconds = len(prompt_ids), time.perf_counter() - t0
        self.last.gen_tokens = 1
        pos = len(prompt_ids)
        while True:
            if token in stops:
                self.finish_reason = "stop"
                return
            yield token
            if self.last.gen_tokens >= params.max_tokens:
                self.finish_reason = "length"
                return
            t0 = time.perf_counter()
            token = sampler(self.decode_one(token, pos).float())
            self.executor.check_errors()     # a failed CPU expert step raises before its token is used
            self.last.decode_seconds += time.perf_counter() - t0
            self.last.decode_steps += 1
            self.last.gen_tokens += 1
            pos += 1
