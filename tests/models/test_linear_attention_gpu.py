"""CUDA-only (marked `gpu`, skipped on CPU): the hybrid models' GPU paths against the torch oracle, the
flash-linear-attention backend (when installed) and the whole decode step captured as one CUDA graph.

CUDA and CPU engines are compared over ONE directory written with weights drawn on the CPU: a preset built in
memory draws its random weights on the device it is built for (engine/presets.build_in_memory), so
`preset:NAME` on CUDA and on the CPU are two different models (run 25 compared those: a false mismatch)."""

import pytest
import torch

from hotexperts.engine.engine import Engine
from hotexperts.engine.presets import write_hf_dir
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.placement import Placement
from hotexperts.kernels import deltanet as dn
from hotexperts.models.deltanet import GatedDeltaNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3-next")
PROMPT = [5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000] * 11               # 132 tokens: 3 chunks


@pytest.fixture(scope="module", params=PRESETS)
def model_dir(request, tmp_path_factory):
    """The preset written once with weights drawn on the CPU: the same model on every device."""
    return str(write_hf_dir(request.param, tmp_path_factory.mktemp("m") / "m", dtype="float32", device="cpu"))


@pytest.mark.skipif(dn._fla() is None, reason="flash-linear-attention is not installed")
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_fla_backend_matches_the_torch_oracle(T):
    g = torch.Generator(device="cuda").manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    q, k, v = r(T, 2, 64), r(T, 2, 64), r(T, 4, 64)
    gate, beta = -torch.rand(T, 4, generator=g, device="cuda"), torch.rand(T, 4, generator=g, device="cuda")
    s_fla = r(4, 64, 64)
    s_ref = s_fla.clone()
    got = dn.gated_delta(q, k, v, gate, beta, s_fla, backend="fla")
    ref = dn.gated_delta(q, k, v, gate, beta, s_ref, backend="torch")
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s_fla, s_ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_graphed_decode_matches_eager_and_the_cpu_oracle(model_dir, backend, monkeypatch):
    monkeypatch.setattr(GatedDeltaNet, "backend", backend)
    params = SamplingParams(max_tokens=16)
    cpu = Engine.load(model_dir, dtype="float32", device="cpu", max_context=256)
    ref = list(cpu.generate(PROMPT, params))
    eager = Engine.load(model_dir, dtype="float32", device="cuda", max_context=256, use_cuda_graph=False)
    graphed = Engine.load(model_dir, dtype="float32", device="cuda", max_context=256)
    assert list(eager.generate(PROMPT, params)) == ref
    assert list(graphed.generate(PROMPT, params)) == ref
    assert graphed.stats()["cuda_graph"]                      # the step with in-place states is one graph
    assert list(graphed.generate(PROMPT[:20], params)) == list(cpu.generate(PROMPT[:20], params))   # reset


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
@pytest.mark.parametrize("prompt_len", [8, 132])
def test_eager_cuda_logits_match_the_cpu_engine(model_dir, placement, prompt_len, monkeypatch):
    """Where a CUDA engine would first part from the CPU one over the same weights: prefill logits, then three
    T=1 steps, eager, torch DeltaNet backend, experts on the GPU executor or the CPU ones; 8 tokens take the
    recurrent DeltaNet form, 132 the chunked one."""
    monkeypatch.setattr(GatedDeltaNet, "backend", "torch")
    prompt, steps = PROMPT[:prompt_len], [11, 400, 23]
    cpu = Engine.load(model_dir, dtype="float32", device="cpu", max_context=256)
    cuda = Engine.load(model_dir, dtype="float32", device="cuda", max_context=256, use_cuda_graph=False,
                       placement=Placement.parse(placement))
    try:
        got = [cuda.prefill(prompt).float().cpu()]
        want = [cpu.prefill(prompt).float()]
        for i, t in enumerate(steps):
            got.append(cuda.decode_one(t, prompt_len + i).float().cpu())
            want.append(cpu.decode_one(t, prompt_len + i).float())
        diffs = [f"{(a - b).abs().max():.2g}" for a, b in zip(got, want, strict=True)]
        assert all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for a, b in zip(got, want, strict=True)), \
            f"max |cuda - cpu| at prefill, step 1, 2, 3: {diffs}"
    finally:
        cuda.close()
