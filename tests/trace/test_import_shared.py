"""Import of the real traces (skips without ../shared/traces) and of tiny hand-written files."""

import json

import numpy as np
import pytest

from hotexperts.trace.format import RoutingTrace, TraceFormatError
from hotexperts.trace.import_shared import (
    ENV_VAR,
    find_shared_traces,
    import_trace,
    load_mixtral_jsonl,
    load_route_csv,
    load_shared,
)

SHARED = find_shared_traces()
needs_shared = pytest.mark.skipif(SHARED is None, reason=f"../shared/traces absent (set ${ENV_VAR})")


def write_jsonl(path, cells):
    with open(path, "w") as f:
        for pid, layer, tok, experts, probs in cells:
            f.write(json.dumps(dict(dataset="d", problem_id=pid, layer=layer, experts=experts,
                                    gating_probs=probs, token_idx=tok)) + "\n")


def test_tiny_jsonl_with_gap(tmp_path):
    cells = [(0, layer, tok, [tok % 8, 7], [0.6, 0.4]) for tok in range(3) for layer in range(2)]
    cells = [c for c in cells if not (c[1] == 1 and c[2] == 1)]            # a missing cell
    cells += [(1, layer, 0, [1, 2], [0.7, 0.3]) for layer in range(2)]
    write_jsonl(tmp_path / "x_routing.jsonl", cells)
    t = load_mixtral_jsonl([tmp_path / "x_routing.jsonl"])
    assert t.ids.shape == (4, 2, 2) and not t.is_prompt.any()
    np.testing.assert_array_equal(t.request, [0, 0, 0, 1])
    np.testing.assert_array_equal(t.ids[1, 1], [-1, -1])
    assert np.isnan(t.weights[1, 1]).all()
    np.testing.assert_array_equal(t.ids[2, 0], [2, 7])
    assert t.missing_fraction() == pytest.approx(1 / 8)
    assert import_trace(tmp_path).num_tokens == 4                          # folder form


CSV = """# route_trace v1
# model=/x/Qwen3-30B-A3B-Q4_K_M.gguf arch=qwen3moe n_layer=2 n_expert=16 n_expert_used=2
# layer=0 expert_bytes=100 dense_bytes=5
# layer=1 expert_bytes=100 dense_bytes=5
turn,phase,step,layer,slot,expert,weight,residency,expert_bytes
0,0,0,0,0,3,0.6,0,100
0,0,0,0,1,4,0.4,0,100
0,0,1,0,0,5,0.7,0,100
0,0,1,0,1,6,0.3,0,100
0,0,1,1,0,7,0.5,0,100
0,0,1,1,1,8,0.5,0,100
0,1,2,0,0,9,0.9,1,0
0,1,2,0,1,3,0.1,1,0
0,1,2,1,0,1,0.8,0,100
0,1,2,1,1,2,0.2,0,100
"""


def test_tiny_route_csv(tmp_path):
    path = tmp_path / "qwen.route.csv"
    path.write_text(CSV)
    t = load_route_csv(path)
    assert t.ids.shape == (3, 2, 2)
    np.testing.assert_array_equal(t.is_prompt, [True, True, False])
    np.testing.assert_array_equal(t.ids[0, 1], [-1, -1])                  # prefill last-layer gap
    np.testing.assert_array_equal(t.ids[2], [[9, 3], [1, 2]])
    assert t.meta["model"] == "Qwen3-30B-A3B" and t.meta["native_top_k"] == 8 and t.num_experts == 16
    assert t.meta["expert_bytes"] == {"0": 100, "1": 100}


def test_bad_sources(tmp_path):
    (tmp_path / "bad.route.csv").write_text("hello\n")
    with pytest.raises(TraceFormatError):
        load_route_csv(tmp_path / "bad.route.csv")
    with pytest.raises(TraceFormatError, match="not found"):
        import_trace(tmp_path / "missing.route.csv")
    with pytest.raises(TraceFormatError, match="unknown shared trace"):
        load_shared("nope")


def test_env_var_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert find_shared_traces() == tmp_path


@needs_shared
@pytest.mark.parametrize("name,shape,prompt", [
    ("mixtral-8x7b", (585, 32, 2), 0), ("qwen3-30b-a3b", (156, 48, 6), 28),
    ("gemma-4-26b-a4b", (157, 30, 6), 29), ("gpt-oss-120b", (149, 36, 2), 85)])
def test_real_traces(name, shape, prompt, tmp_path):
    t = load_shared(name)
    assert t.ids.shape == shape and int(t.is_prompt.sum()) == prompt
    assert t.decode_only().missing_fraction() < 0.02
    w = t.weights.astype(np.float64)
    ok = t.ids[:, :, 0] >= 0
    np.testing.assert_allclose(np.nansum(w, -1)[ok], 1.0, atol=3e-3)     # weights sum to 1 per cell
    assert t.meta["source"].startswith("shared:") and t.meta["notes"]
    u = RoutingTrace.load(t.save(tmp_path / "t.npz"))
    np.testing.assert_array_equal(u.ids, t.ids)
