"""Sampling: `SamplingParams` (frozen, validated) and `sample(logits, params, generator) -> token id`.

temperature below MIN_TEMPERATURE (0 included) means greedy (argmax): a temperature too small to divide
by is the limit it tends to. Otherwise the logits are divided by the temperature and the
distribution is restricted, in this order, by top_k (keep the k largest), top_p (keep the smallest set of
tokens whose probability mass reaches top_p) and min_p (drop tokens below min_p * the largest
probability), then one token is drawn with the given torch.Generator. Everything runs on the logits'
device; the only host synchronisation is reading the chosen token id at the end. The most likely token is
never filtered out (top_p 1e-300 keeps it), and a distribution with no finite mass left (NaN logits) falls
back to argmax, so the probabilities handed to torch.multinomial are never NaN or all zero.

Penalties (`Sampler`, one per request) change the logits before all of that, greedy included:
repetition_penalty r (Hugging Face / CTRL: over the prompt and the generated tokens, a positive logit is
divided by r, a negative one multiplied), then OpenAI's frequency_penalty f and presence_penalty p (over
the generated tokens: logit -= f * count + p * (count > 0)). At their neutral values (1, 0, 0) the logits
are not touched, so greedy decoding stays exactly argmax of the model's logits.
logprobs=K (not None) makes the Sampler record, for each chosen token, its log-probability and the K most
likely alternatives, from log_softmax of the logits the sampler saw (after penalties, before temperature,
as vLLM's default): `Sampler.logprobs[i] = (token_id, logprob, ((id, logprob), ...))`.
`Sampler.accept(logits, draft)` is one row of a speculative verify step (engine/speculative.py): greedy
takes the argmax as __call__ does; sampling accepts the draft with probability p(draft) and otherwise draws
from p without it, renormalised (`accept_draft`), so the tokens follow p exactly as __call__'s would.
`generation_defaults(generation_config)` gives the sampling values a model ships with (Hugging Face's rule:
greedy unless do_sample is true), the defaults of `generate`, the server and its chat page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hotexperts.errors import HotExpertsError

MIN_TEMPERATURE = 1e-5        # below: greedy (vLLM's threshold); 1 / T then fits float32 with room
MAX_LOGPROBS = 20             # OpenAI's top_logprobs limit
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0            # 0 = greedy
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0                  # 1 = off
    min_p: float = 0.0                  # 0 = off
    seed: int | None = None             # None = nondeterministic
    max_tokens: int = 256               # tokens to generate at most
    stop: tuple[str, ...] = ()          # stop strings (handled by engine/textstream.py)
    stop_token_ids: tuple[int, ...] = ()   # extra stop ids besides the model's EOS ids
    presence_penalty: float = 0.0       # OpenAI's, in [-2, 2]; 0 = off
    frequency_penalty: float = 0.0      # OpenAI's, in [-2, 2]; 0 = off
    repetition_penalty: float = 1.0     # Hugging Face's, > 0; 1 = off
    logprobs: int | None = None         # None = off; K >= 0: record the chosen token's logprob + K top ones

    def __post_init__(self):
        object.__setattr__(self, "stop", _tuple_of(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids", _tuple_of(self.stop_token_ids, int, "stop_token_ids"))
        _check(_is_real(self.temperature) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(all(s for s in self.stop), "stop strings must not be empty")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_real(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
        _check(_is_real(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(self.logprobs is None or _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS,
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise HotExpertsError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tuple_of(values, kind: type, name: str) -> tuple:
    if isinstance(values, str | int):
        values = (values,)
    values = tuple(values or ())
    _check(all(isinstance(v, kind) and not isinstance(v, bool) for v in values),
           f"{name} must be a list of {kind.__name__}, got {values!r}")
    return values


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device`, seeded by params.seed (or from the OS when seed is None)."""
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> probabilities [V] float32 after temperature, top_k, top_p and min_p."""
    logits = logits.float()
    logits = (logits - logits.max()) / params.temperature               # [V], max 0: no overflow
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)                               # [V]
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)           # [V]
        mass_before = sorted_p.cumsum(-1) - sorted_p                    # mass of strictly better tokens
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False                                          # the top token is always kept
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def sample_tensor(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [V] -> chosen token id as a 0-d int64 tensor on the logits' device (no host sync)."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    probs = filtered_probs(logits, params)
    total = probs.sum()
    ok = torch.isfinite(total) & (total > 0)
    safe = torch.where(ok, torch.nan_to_num(probs, nan=0.0), torch.ones_like(probs))   # no host sync
    drawn = torch.multinomial(safe, 1, generator=generator)[0]
    return torch.where(ok, drawn, torch.argmax(torch.nan_to_num(logits.float(), nan=-math.inf), dim=-1))


def accept_draft(probs: torch.Tensor, draft: int,
                 generator: torch.Generator | None = None) -> tuple[int | None, bool]:
    """probs [V] (filtered_probs) and a drafted token -> (token, accepted): the draft with probability
    probs[draft] / sum(probs), else a draw from probs without the draft (renormalised). (None, False) when
    probs has no finite positive mass. Two host reads: the uniform draw and, on rejection, the token."""
    total = float(probs.sum())
    if not math.isfinite(total) or total <= 0:
        return None, False
    u = float(torch.rand((), generator=generator, device=probs.device))
    if 0 <= draft < probs.shape[-1] and u * total < float(probs[draft]):
        return int(draft), True
    rest = probs.clone()
    if 0 <= draft < rest.shape[-1]:
        rest[draft] = 0.0
    if not float(rest.sum()) > 0:                           # all the mass was on the draft
        return int(draft), True
    return int(torch.multinomial(rest, 1, generator=generator)[0]), False


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits [V] float -> token id. Reading the id is the one host synchronisation."""
    return int(sample_tensor(logits, params, generator).item())


def model_generation_config(engine) -> dict | None:
    """The model's generation_config.json (the loaded source's, else the tokenizer's), None without one."""
    for owner in (getattr(engine, "loaded", None), getattr(engine, "tokenizer", None)):
        cfg = getattr(owner, "generation_config", None)
        if isinstance(cfg, dict) and cfg:
            return cfg
    return None


def generation_defaults(generation_config: dict | None) -> dict:
    """The sampling values a model's generation_config.json asks for, keyed as SamplingParams.
    Hugging Face's rule: without do_sample true, decoding is greedy (temperature 0) whatever else it says."""
    cfg = generation_config if isinstance(generation_config, dict) else {}
    out = {k: cfg[k] for k in SAMPLING_KEYS if _is_real(cfg.get(k))}
    if cfg.get("do_sample") is not True:
        return {"temperature": 0.0} | ({"repetition_penalty": out["repetition_penalty"]}
                                       if "repetition_penalty" in out else {})
    return {"temperature": 1.0} | out


class Sampler:
    """One request's sampling: `sampler(logits [V]) -> token id`, with the penalties' token counts and the
    logprobs record (module docstring). Without penalties or logprobs it is exactly `sample`."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None,
                 prompt_ids: list[int] = ()):
        self.params, self.generator = params, generator
        self.prompt_ids = list(prompt_ids)
        self.counts: torch.Tensor | None = None          # [V] float32, generated-token counts
        self.seen: torch.Tensor | None = None            # [V] bool, prompt + generated tokens
        self.logprobs: list[tuple] = []

    def __call__(self, logits: torch.Tensor) -> int:
        logits = self._penalize(logits.float()) if self.params.penalized else logits
        return self._chose(logits, sample(logits, self.params, self.generator))

    def accept(self, logits: torch.Tensor, draft: int) -> tuple[int, bool]:
        """One verify row: logits [V] against the drafted token -> (token, accepted). Greedy: the argmax
        (accepted when it is the draft), exactly what __call__ returns. Sampling: the speculative acceptance
        rule for a one-hot draft distribution: accept with probability p(draft) (p: the filtered
        distribution __call__ samples from), else draw from p with the draft removed, renormalised."""
        p = self.params
        logits = self._penalize(logits.float()) if p.penalized else logits
        if p.greedy:
            token = sample(logits, p, self.generator)
            return self._chose(logits, token), token == draft
        token, accepted = accept_draft(filtered_probs(logits, p), draft, self.generator)
        if token is None:                                   # no finite mass (NaN logits): as sample()
            token = sample(logits, p, self.generator)
        return self._chose(logits, token), accepted

    def _chose(self, logits: torch.Tensor, token: int) -> int:
        """Record the chosen token: its logprobs entry and the penalties' counts."""
        p = self.params
        if p.logprobs is not None:
            self.logprobs.append(token_logprobs(logits, token, p.logprobs))
        if p.penalized:
            self.counts[token] += 1
            self.seen[token] = True
        return token

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.counts is None:
            self.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            ids = [t for t in self.prompt_ids if 0 <= t < logits.shape[-1]]
            if ids:
                self.seen[torch.tensor(ids, device=logits.device)] = True
        if p.repetition_penalty != 1:
            r = p.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if p.frequency_penalty or p.presence_penalty:
            present = (self.counts > 0).float()
            logits = logits - self.counts * p.frequency_penalty - present * p.presence_penalty
        return logits


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple:
    """(token, its logprob, ((id, logprob) of the k most likely tokens, best first)) from logits [V]."""
    lp = torch.log_softmax(torch.nan_to_num(logits.float(), nan=-math.inf), dim=-1)
    top = torch.topk(lp, k) if k else None
    alts = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
    return int(token), float(lp[token]), alts
