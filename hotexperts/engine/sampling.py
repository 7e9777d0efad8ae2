"""Sampling: `SamplingParams` (frozen, validated) and `sample(logits, params, generator) -> token id`.

temperature below MIN_TEMPERATURE (0 included) means greedy (argmax): a temperature too small to divide
by is the limit it tends to. Otherwise the logits are divided by the temperature and the
distribution is restricted, in this order, by top_k (keep the k largest), top_p (keep the smallest set of
tokens whose probability mass reaches top_p) and min_p (drop tokens below min_p * the largest
probability), then one token is drawn with the given torch.Generator. Everything runs on the logits'
device; the only host synchronisation is reading the chosen token id at the end. The most likely token is
never filtered out (top_p 1e-300 keeps it), and a distribution with no finite mass left (NaN logits) falls
back to argmax, so the probabilities handed to torch.multinomial are never NaN or all zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hotexperts.errors import HotExpertsError

MIN_TEMPERATURE = 1e-5        # below: greedy (vLLM's threshold); 1 / T then fits float32 with room


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

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits [V] float -> token id. Reading the id is the one host synchronisation."""
    return int(sample_tensor(logits, params, generator).item())
