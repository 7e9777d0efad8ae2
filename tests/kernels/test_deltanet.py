"""kernels/deltanet.py's call into flash-linear-attention, on CPU with stand-ins that have fla 0.6's real
signatures (fla itself is CUDA only): g and beta reach both functions by name, and the result is the torch
oracle's. fla 0.6's fused_recurrent takes `gk` (a per-key decay) 5th where chunk takes beta: a positional
beta silently computed another recurrence (measured on an H100: T=1 relative error 1.06)."""

from __future__ import annotations

import pytest
import torch

from hotexperts.kernels import deltanet as dn


def _oracle(q, k, v, g, beta, initial_state):
    """fla's contract over [1, T, Hv, d] inputs (q, k already one per value head) via the torch path."""
    state = initial_state[0].clone()
    o = dn.gated_delta(q[0], k[0], v[0], g[0], beta[0], state, "torch")
    return o[None], state[None]


def fused_recurrent(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                    output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    assert gk is None and gv is None and beta is not None and use_qk_l2norm_in_kernel
    return _oracle(q, k, v, g, beta, initial_state)


def chunk(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
          use_qk_l2norm_in_kernel=False, **kwargs):
    assert use_qk_l2norm_in_kernel
    return _oracle(q, k, v, g, beta, initial_state)


@pytest.mark.parametrize("T", [1, 5, 40])
def test_fla_gets_g_and_beta_by_name_and_gives_the_oracle(monkeypatch, T):
    monkeypatch.setattr(dn, "_FLA", [(chunk, fused_recurrent)])
    torch.manual_seed(0)
    Hk, Hv, d = 2, 4, 8
    q, k, v = torch.randn(T, Hk, d), torch.randn(T, Hk, d), torch.randn(T, Hv, d)
    g, beta = -torch.rand(T, Hv), torch.rand(T, Hv)
    s_fla = torch.randn(Hv, d, d)
    s_ref = s_fla.clone()
    got = dn._gated_delta_fla(q, k, v, g, beta, s_fla)
    want = dn.gated_delta(q, k, v, g, beta, s_ref, "torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_fla, s_ref, atol=1e-5, rtol=1e-5)
