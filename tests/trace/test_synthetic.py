"""Synthetic routing: shape, determinism, parameter effects, and the presets' calibration targets."""

from dataclasses import replace

import numpy as np
import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.trace import stats
from hotexperts.trace.synthetic import (
    PRESETS,
    SyntheticParams,
    calibrate,
    check,
    check_preset,
    generate,
    preset,
)

SMALL = SyntheticParams(num_experts=32, top_k=4, num_layers=3, gen_tokens=300)


def test_shape_requests_and_weights():
    p = replace(SMALL, num_requests=2, prompt_tokens=5, gen_tokens=10)
    t = generate(p)
    assert t.ids.shape == (30, 3, 4) and t.num_experts == 32
    np.testing.assert_array_equal(t.request, [0] * 15 + [1] * 15)
    assert t.is_prompt.sum() == 10 and t.is_prompt[:5].all() and not t.is_prompt[5:15].any()
    assert all(len(set(cell)) == 4 for cell in t.ids.reshape(-1, 4).tolist())   # distinct per cell
    w = t.weights.astype(np.float32)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=5e-3)
    assert (np.diff(w, axis=-1) <= 1e-3).all()                                  # descending by slot
    assert t.meta["synthetic"]["top_k"] == 4 and t.meta["source"] == "synthetic"


def test_deterministic_by_seed():
    a, b, c = generate(SMALL), generate(SMALL), generate(SMALL, seed=1)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)


def test_layers_get_different_hot_experts():
    t = generate(replace(SMALL, zipf=1.5, p_repeat=0.0, p_recent=0.0))
    top = [np.bincount(t.ids[:, layer].ravel(), minlength=32).argmax() for layer in range(3)]
    assert len(set(top)) > 1


def test_knobs_move_the_statistics():
    base = replace(SMALL, zipf=0.0, p_repeat=0.0, p_recent=0.0, gen_tokens=600)
    uniform = stats.summarize(generate(base), fractions=(0.25,))
    assert uniform["repeat"] == pytest.approx(4 / 32, abs=0.02)
    assert stats.summarize(generate(replace(base, p_repeat=0.5)))["repeat"] > uniform["repeat"] + 0.3
    assert stats.summarize(generate(replace(base, zipf=1.5)))["top10_share"] > uniform["top10_share"] + 0.3


def test_topic_shift_lowers_static_coverage():
    base = replace(SMALL, zipf=1.2, p_repeat=0.0, p_recent=0.0, gen_tokens=1000)
    still = stats.static_coverage(generate(base), 4).mean()
    moved = stats.static_coverage(generate(replace(base, shift_every=100, shift_fraction=1.0)), 4).mean()
    assert moved < still - 0.1


def test_invalid_params():
    with pytest.raises(HotExpertsError):
        SyntheticParams(p_repeat=0.8, p_recent=0.3)
    with pytest.raises(HotExpertsError):
        SyntheticParams(num_experts=4, top_k=8)
    with pytest.raises(HotExpertsError, match="known"):
        preset("nope")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_hit_their_targets(name):
    """The calibration table of docs/routing.md: each preset's statistics land in its target ranges
    (8 layers: layers are independent, so the layer means match the full-depth model's)."""
    rows = check_preset(name, num_tokens=2048, num_layers=8)
    assert all(r["ok"] for r in rows), rows


def test_calibrate_finds_a_repeat_target():
    p = replace(SMALL, p_repeat=0.0, p_recent=0.0)
    targets = {"repeat": (0.45, 0.55)}
    values = [0.0, 0.2, 0.5, 0.8]
    fitted = calibrate(p, targets, {"p_repeat": values}, rounds=1, num_tokens=300, num_layers=3)
    got = {v: check(replace(p, p_repeat=v), targets, 300)[0]["value"] for v in values}
    assert fitted.p_repeat == min(values, key=lambda v: abs(got[v] - 0.5))
    assert fitted.p_repeat in (0.2, 0.5)
