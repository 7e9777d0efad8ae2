"""Speculative decoding's parts: the draft settings, the model-free n-gram drafter, the automatic off-switch
and the statistics. The loop that uses them is Generator's (engine/generate.py).

    spec = SpecConfig(method="ngram", draft_max=8, draft_min=1)      # "none": plain decoding
    drafter = NgramDrafter(history_ids, ngram_max=3, ngram_min=2)
    drafter.append(token); drafter.draft(k) -> list[int]  (at most k tokens; [] when nothing matches)
    switch = AutoSwitch(); switch.allow() -> bool; switch.record(drafted, tokens, seconds)
    stats = SpecStats(); stats.as_dict()

One step (Generator): the last sampled token t0 (not yet in the cache) and a draft d1..dk go through one
verify forward at positions pos..pos+k (engine/runner/verify.py) -> logits rows 0..k. Row i is sampled (the
request's Sampler: penalties, temperature, top-k/p, min-p, logprobs, in token order) against d_{i+1}:
greedy accepts d_{i+1} when it is the argmax, so the tokens are those of plain greedy decoding; sampling uses
the standard speculative acceptance rule with the draft distribution one-hot (a deterministic drafter):
accept d with probability p(d), else draw from p with d removed and renormalised (sampling.Sampler.accept).
The first rejected row's token, or row k's if every draft token is accepted, ends the step: 1..k+1 tokens.

Prompt lookup (n-gram) drafting: the longest suffix of the tokens so far (prompt + generated), from
ngram_max down to ngram_min tokens, that occurred before; the draft is the up to k tokens that followed its
latest earlier occurrence. An index of n-gram -> latest end position is kept up to date as tokens arrive, so
a lookup costs O(ngram_max), not a scan of the history.

The off-switch (AutoSwitch) compares measured tokens/s of drafting steps with plain T=1 steps over the last
`window` steps of each kind, once `window` drafting steps have run since its last decision; when drafting is
slower it turns drafting off for `cooldown` steps, then measures again (acceptance changes with the text).
Without `window` plain steps measured it first runs that many plain steps (drafting found nothing, or the
switch probes).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

from hotexperts.engine.runner.verify import MAX_VERIFY_T
from hotexperts.errors import HotExpertsError

DRAFT_METHODS = ("none", "ngram", "mtp")


@dataclass(frozen=True)
class SpecConfig:
    """method: "none" | "ngram" | "mtp" (not written yet: refused); draft_max: tokens drafted at most per step
    (a verify step is draft_max + 1 tokens, at most MAX_VERIFY_T); draft_min: fewer drafted tokens than
    this and the step is a plain one (llama.cpp's --draft-min); ngram_max/ngram_min: the suffix lengths the
    prompt lookup tries; auto_off: the measured off-switch."""

    method: str = "none"
    draft_max: int = 8
    draft_min: int = 1
    ngram_max: int = 3
    ngram_min: int = 2
    auto_off: bool = True

    def __post_init__(self):
        if self.method not in DRAFT_METHODS:
            raise HotExpertsError(f"--draft must be one of {', '.join(DRAFT_METHODS)}, got {self.method!r}")
        if self.method == "mtp":
            raise HotExpertsError("--draft mtp (the checkpoint's multi-token-prediction layer) is not "
                                  "written yet; use --draft ngram")
        if not (isinstance(self.draft_max, int) and 1 <= self.draft_max <= MAX_VERIFY_T - 1):
            raise HotExpertsError(f"--draft-max must be in [1, {MAX_VERIFY_T - 1}], got {self.draft_max!r}")
        if not (isinstance(self.draft_min, int) and 0 <= self.draft_min <= self.draft_max):
            raise HotExpertsError(f"--draft-min must be in [0, --draft-max = {self.draft_max}], "
                                  f"got {self.draft_min!r}")
        if not (isinstance(self.ngram_min, int) and isinstance(self.ngram_max, int)
                and 1 <= self.ngram_min <= self.ngram_max):
            raise HotExpertsError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.ngram_min}, "
                                  f"{self.ngram_max}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


class NgramDrafter:
    """Prompt-lookup drafting over one request's tokens (module docstring)."""

    def __init__(self, history: list[int] = (), ngram_max: int = 3, ngram_min: int = 2):
        self.tokens: list[int] = []
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in self.sizes}
        self.indexed = 0                       # n-grams ending before this position are in the index
        for t in history:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(int(token))

    def _index_up_to(self, end: int) -> None:
        """Index the n-grams ending at positions indexed+1..end-1 (each has a token after it)."""
        toks = self.tokens
        for e in range(max(self.indexed, 1), end):
            for n in self.sizes:
                if e >= n:
                    self.index[n][tuple(toks[e - n:e])] = e
        self.indexed = max(self.indexed, end)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        toks, L = self.tokens, len(self.tokens)
        if k <= 0 or L < 2:
            return []
        self._index_up_to(L)
        for n in self.sizes:
            if L < n:
                continue
            end = self.index[n].get(tuple(toks[L - n:]))
            if end is not None:
                return toks[end:end + k]
        return []


class AutoSwitch:
    """Drafting on or off from measured tokens/s (module docstring). record() takes one step's measurement."""

    def __init__(self, window: int = 16, cooldown: int = 64, enabled: bool = True):
        self.window, self.cooldown, self.enabled = window, cooldown, enabled
        self.spec: deque = deque(maxlen=window)      # (tokens, seconds) of drafting steps
        self.plain: deque = deque(maxlen=window)     # of plain steps
        self.off_steps = 0                           # plain steps left before drafting is tried again
        self.probe = 0                               # plain steps left to measure the plain rate
        self.switched_off = 0                        # times the switch turned drafting off

    @staticmethod
    def rate(samples) -> float:
        seconds = sum(s for _, s in samples)
        return sum(t for t, _ in samples) / seconds if seconds > 0 else 0.0

    def allow(self) -> bool:
        if not self.enabled:
            return True
        return self.off_steps == 0 and self.probe == 0

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        if not self.enabled:
            return
        if not drafted:
            self.plain.append((tokens, seconds))
            self.off_steps = max(0, self.off_steps - 1)
            self.probe = max(0, self.probe - 1)
            return
        self.spec.append((tokens, seconds))
        if len(self.spec) < self.window:
            return
        if len(self.plain) < self.window:
            self.probe = self.window - len(self.plain)          # measure plain decoding first
            self.spec.clear()                                   # then `window` fresh drafting steps
        elif self.rate(self.spec) < self.rate(self.plain):
            self.off_steps, self.switched_off = self.cooldown, self.switched_off + 1
            self.spec.clear()

    @property
    def state(self) -> str:
        if not self.enabled:
            return "disabled"
        return "off" if self.off_steps else "probing" if self.probe else "on"


@dataclass
class SpecStats:
    """Speculative decoding counters (engine.stats()["speculative"]); `add` sums another's."""

    verify_steps: int = 0          # verify forwards (T >= 2)
    plain_steps: int = 0           # T=1 forwards while drafting was on (no draft, or switched off)
    drafted: int = 0               # draft tokens proposed to verify steps
    accepted: int = 0              # of those, accepted
    emitted: int = 0               # tokens the verify steps produced (accepted + one each)
    draft_seconds: float = 0.0     # drafting's own cost (the lookup)
    verify_seconds: float = 0.0    # verify forwards + acceptance
    rollbacks: int = 0             # linear-attention state restored and the accepted tokens recomputed
    rollback_seconds: float = 0.0
    expert_cells: int = 0          # verify steps' routed (token, k) cells over MoE layer calls
    layer_calls: int = 0           # verify steps' MoE layer calls
    distinct_experts: int = 0      # distinct experts summed over those calls (the step's expert union)

    def add(self, other: SpecStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        n, calls = self.verify_steps, self.layer_calls
        d["accepted_per_step"] = self.accepted / n if n else 0.0          # draft tokens kept per verify
        d["tokens_per_step"] = self.emitted / n if n else 0.0             # tokens produced per verify
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        d["distinct_experts_per_layer"] = self.distinct_experts / calls if calls else 0.0
        d["cells_per_layer"] = self.expert_cells / calls if calls else 0.0
        return d
