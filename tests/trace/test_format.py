"""RoutingTrace: construction, validation, views, concat and the .npz round trip."""

import numpy as np
import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace, TraceFormatError, concat


def make(n=6, lm=3, k=2, e=8, prompt=2, request=0):
    rng = np.random.default_rng(n)
    ids = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(lm)]) for _ in range(n)])
    w = rng.random((n, lm, k))
    is_prompt = np.arange(n) < prompt
    meta = dict(model="m", num_experts=e, top_k=k, moe_layers=[1, 2, 4][:lm], source="test")
    return RoutingTrace(ids, w, is_prompt, np.full(n, request), meta)


def test_dtypes_and_shape():
    t = make()
    assert t.ids.dtype == np.int16 and t.weights.dtype == np.float16
    assert t.is_prompt.dtype == bool and t.request.dtype == np.int32
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (6, 3, 2, 8)
    assert t.meta["notes"] == []


def test_round_trip(tmp_path):
    t = make()
    t.ids[3, 1] = -1
    t.weights[3, 1] = np.nan
    t.meta["notes"] = ["a caveat"]
    path = t.save(tmp_path / "x.npz")
    u = RoutingTrace.load(path)
    np.testing.assert_array_equal(u.ids, t.ids)
    np.testing.assert_array_equal(u.weights, t.weights)     # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(u.is_prompt, t.is_prompt)
    assert u.meta == t.meta and u.step is None
    assert u.missing_fraction() == pytest.approx(1 / 18)


def test_step_round_trip(tmp_path):
    t = make()
    t.step = np.array([0, 0, 1, 2, 3, 4], np.int32)
    u = RoutingTrace.load(t.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(u.step, t.step)


def test_iterations_derived():
    t = make(prompt=3)
    np.testing.assert_array_equal(t.iterations(), [0, 0, 0, 1, 2, 3])
    both = concat([make(n=3, prompt=2), make(n=3, prompt=2)])
    np.testing.assert_array_equal(both.iterations(), [0, 0, 1, 2, 2, 3])


def test_views():
    t = make(prompt=2)
    d = t.decode_only()
    assert d.num_tokens == 4 and not d.is_prompt.any()
    np.testing.assert_array_equal(d.ids, t.ids[2:])
    s = t.select_layers([4, 1])
    assert s.meta["moe_layers"] == [1, 4]
    np.testing.assert_array_equal(s.ids, t.ids[:, [0, 2]])
    with pytest.raises(TraceFormatError):
        t.select_layers([3])


def test_concat_renumbers_requests():
    a, b = make(n=4, request=0), make(n=3, request=0)
    c = concat([a, b])
    assert c.num_tokens == 7
    np.testing.assert_array_equal(c.request, [0, 0, 0, 0, 1, 1, 1])
    with pytest.raises(TraceFormatError):
        concat([make(lm=3), make(lm=2)])


def test_validation_errors():
    t = make()
    with pytest.raises(TraceFormatError, match="weights shape"):
        RoutingTrace(t.ids, t.weights[:, :1], t.is_prompt, t.request, t.meta)
    with pytest.raises(TraceFormatError, match="meta lacks"):
        RoutingTrace(t.ids, t.weights, t.is_prompt, t.request, {"model": "m"})
    bad = t.ids.copy()
    bad[0, 0, 0] = 8
    with pytest.raises(TraceFormatError, match="outside"):
        RoutingTrace(bad, t.weights, t.is_prompt, t.request, t.meta)


def test_load_errors(tmp_path):
    with pytest.raises(TraceFormatError, match="not found"):
        RoutingTrace.load(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(HotExpertsError, match="not a readable"):
        RoutingTrace.load(junk)
    good = make().save(tmp_path / "g.npz")
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TraceFormatError):
        RoutingTrace.load(tmp_path / "cut.npz")
    other = tmp_path / "other.npz"
    with open(other, "wb") as f:
        np.savez(f, x=np.zeros(3))
    with pytest.raises(TraceFormatError, match="missing arrays"):
        RoutingTrace.load(other)


def test_numpy_modules_import_no_torch():
    """The simulator depends on these: they must stay torch-free."""
    import subprocess
    import sys

    code = ("import sys, hotexperts.trace.format, hotexperts.trace.import_shared, "
            "hotexperts.trace.synthetic, hotexperts.trace.stats;\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
