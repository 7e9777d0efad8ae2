"""Cache policies, one per file, and their registry (torch-free, numpy only).

    make_policy(name, **params) -> CachePolicy        lru | window-lfu | decay | static | belady | auto
    policy_from_profile(profile, name=None, **overrides) -> the policy a profile names, with its parameters
    POLICIES, ALIASES, LIVE_POLICIES (belady needs the future: simulation only)

The contract every policy follows is in policies/base.py; the planner (experts/planner.py) drives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hotexperts.errors import HotExpertsError
from hotexperts.experts.policies.adaptive import Adaptive
from hotexperts.experts.policies.base import NEG, CachePolicy, Capacity, Swap, plan_by_scores
from hotexperts.experts.policies.belady import Belady
from hotexperts.experts.policies.decay import Decay
from hotexperts.experts.policies.lru import LRU
from hotexperts.experts.policies.static import Static
from hotexperts.experts.policies.window_lfu import WindowLFU

if TYPE_CHECKING:
    from hotexperts.experts.profile import Profile

__all__ = ["ALIASES", "LIVE_POLICIES", "LRU", "NEG", "POLICIES", "Adaptive", "Belady", "CachePolicy",
           "Capacity", "Decay", "Static", "Swap", "WindowLFU", "make_policy", "plan_by_scores",
           "policy_from_profile"]

POLICIES = {"lru": LRU, "window-lfu": WindowLFU, "decay": Decay, "static": Static, "belady": Belady,
            "auto": Adaptive}
ALIASES = {"adaptive": "auto", "lfu": "window-lfu", "windowlfu": "window-lfu"}
LIVE_POLICIES = ("lru", "window-lfu", "decay", "static", "auto")


def _key(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower())


def make_policy(name: str, **params) -> CachePolicy:
    """Policy by name; `params` go to its constructor (static: profile=..., belady: future=...)."""
    key = _key(name)
    if key not in POLICIES:
        raise HotExpertsError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return POLICIES[key](**params)
    except TypeError as e:
        raise HotExpertsError(f"bad parameters for policy {key!r}: {e}") from None


def policy_from_profile(profile: Profile, name: str | None = None, **overrides) -> CachePolicy:
    """The policy a profile names (written by `auto`), with its parameters; `overrides` win."""
    key = _key(name or profile.policy or "static")
    if key == "static":
        return make_policy("static", profile=profile)
    params = dict(profile.params) if _key(profile.policy or "") == key else {}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return make_policy(key, **params)
