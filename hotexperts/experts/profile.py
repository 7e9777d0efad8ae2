"""Routing profiles (JSON): per MoE layer expert counts (or scores) and a hot set, most valuable first.

    Profile(num_experts, counts {layer: [E]}, hot {layer: [experts]}, policy, params, meta)
    save_profile(path, profile) / load_profile(path, num_experts=None)   (ProfileError on a bad file)
    profile_from_counts(counts, capacity=K | {layer: K}, budget=None) -> Profile (top experts per layer, or
        the top `budget` (layer, expert) pairs overall)
Written by `--save-profile` and `hotexperts auto`, read by `--moe-profile` (static placement or warm start).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError, read_json
from hotexperts.experts.policies.base import Capacity, plan_by_scores
from hotexperts.experts.policies.static import Static

PROFILE_FORMAT = "hotexperts-profile"


class ProfileError(HotExpertsError):
    """A routing profile file is missing, corrupt, or does not fit the model."""


@dataclass
class Profile:
    num_experts: int
    counts: dict[int, list[float]]           # layer -> [E] routing counts (or scores)
    hot: dict[int, list[int]]                # layer -> hot set, most valuable first
    policy: str | None = None                # policy `auto` chose (None: static placement)
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def profile_from_counts(counts: Mapping[int, Sequence[float]],
                        capacity: int | Mapping[int, int] | None = None, budget: int | None = None,
                        **meta) -> Profile:
    """Hot set = top-`capacity` experts per layer, or the top `budget` (layer, expert) pairs overall."""
    counts = {int(l): np.asarray(c, np.float64) for l, c in counts.items()}
    E = len(next(iter(counts.values())))
    pol = Static(None)
    pol.bind(list(counts), E)
    pol.seed(Profile(E, {l: c.tolist() for l, c in counts.items()}, {}))
    caps = capacity if isinstance(capacity, Mapping) else {l: capacity or E for l in counts}
    plan = plan_by_scores(pol, 0, {l: set() for l in counts}, Capacity(caps, budget))
    hot = {l: [] for l in counts}
    for l, c, _ in plan:
        if c is not None:
            hot[l].append(c)
    return Profile(E, {l: c.tolist() for l, c in counts.items()}, hot, meta=dict(meta))


def save_profile(path: str | Path, profile: Profile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": PROFILE_FORMAT, "version": 1, "num_experts": profile.num_experts,
           "policy": profile.policy, "params": profile.params, "meta": profile.meta,
           "layers": {str(l): {"counts": [round(float(x), 6) for x in profile.counts.get(l, [])],
                               "hot": [int(e) for e in profile.hot.get(l, [])]}
                      for l in sorted(set(profile.counts) | set(profile.hot))}}
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_profile(path: str | Path, num_experts: int | None = None) -> Profile:
    path = Path(path)
    doc = read_json(path, "routing profile", ProfileError)
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT or "layers" not in doc:
        raise ProfileError(f"{path} is not a hotexperts routing profile (format {PROFILE_FORMAT!r})")
    E = int(doc["num_experts"])
    if num_experts is not None and E != num_experts:
        raise ProfileError(f"{path} is for a model with {E} experts per layer, this one has {num_experts}")
    counts, hot = {}, {}
    for key, entry in doc["layers"].items():
        l = int(key)
        counts[l] = [float(x) for x in entry.get("counts", [])] or [0.0] * E
        hot[l] = [int(e) for e in entry.get("hot", [])]
        if len(counts[l]) != E or any(not 0 <= e < E for e in hot[l]):
            raise ProfileError(f"{path}: layer {l} has counts for {len(counts[l])} experts or hot ids "
                               f"outside [0, {E - 1}]")
    params, meta = dict(doc.get("params") or {}), dict(doc.get("meta") or {})
    return Profile(E, counts, hot, doc.get("policy"), params, meta)
