"""Cost model: hand-computed decode cases of the graphed worker path, sanity, hardware profiles (JSON)."""

from dataclasses import replace

import numpy as np
import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.trace.costmodel import (
    SHAPES,
    ModelShape,
    default_policy,
    gpu_share_of,
    miss_pmf,
    predict,
    predict_cache,
    shape_for_trace,
)
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.profiles import BUILTIN, get_profile, load_hardware, save_hardware
from hotexperts.trace.simulate import simulate

QWEN = SHAPES["qwen3-30b-a3b"]
US = 1e-6

# A toy shape and profile with round numbers: every expert 6000 B (D=100, I=10, bf16 both sides), dense
# 10000 B per layer, lm_head 20000 B; HBM 1 GB/s -> dense 10 us per layer and head 20 us; a hit expert
# 6000 B / 0.6 GB/s = 10 us; a CPU expert 6000 B / 0.3 GB/s = 20 us; over PCIe 6000 B / 0.6 GB/s = 10 us.
TOY = ModelShape("toy", num_layers=3, num_moe_layers=2, num_experts=4, top_k=2, hidden_size=100,
                 moe_intermediate_size=10, dense_params_per_layer=5000, head_params=10000,
                 gpu_bytes_per_param=2.0, cpu_format="bf16")
TOY_HW = replace(BUILTIN["h200"], gpu_hbm_gbs=1.0, gpu_expert_gbs={"bf16": 0.6}, cpu_expert_gbs={"bf16": 0.3},
                 h2d_gbs=0.6, gpu_layer_s=5 * US, gpu_moe_launch_s=2 * US, post_s=3 * US, handoff_s=4 * US,
                 cpu_call_s=50 * US, gpu_host_read_s=30 * US, host_step_s=100 * US,
                 host_policy_s={"window-lfu": 150 * US, "auto": 200 * US}, host_swap_s=0.0)


def ms(p) -> float:
    return 1e3 / p.decode_tps


def random_trace(n, lm=2, k=2, e=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.permutation(e)[:k] for _ in range(lm)] for _ in range(n)]).astype(np.int16)
    meta = dict(model="toy", num_experts=e, top_k=k, moe_layers=list(range(lm)), source="test")
    return RoutingTrace(ids, np.ones(ids.shape, np.float16), np.zeros(n, bool), np.zeros(n, np.int32), meta)


# ---- hand-computed cases (docs/simulator.md, "Decode") -----------------------------------------------
def test_toy_units():
    assert TOY.expert_bytes_gpu == TOY.expert_bytes_cpu == 6000 and TOY.gpu_format == "bf16"
    assert miss_pmf(2, 0.5) == pytest.approx([0.25, 0.5, 0.25])
    assert miss_pmf(8, 1.0)[0] == 1.0 and miss_pmf(8, 0.0)[8] == 1.0
    assert [gpu_share_of(n, 2) for n in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]    # one per 4, at most 2
    assert [gpu_share_of(n, 1, share=1) for n in range(3)] == [0, 1, 1]                # run 5: the first N
    assert gpu_share_of(8, 0) == 0
    assert default_policy("hot:4") == "window-lfu" and default_policy("cache:9") == "auto"


def test_gpu_placement_is_the_graphed_step():
    # dense 3 x (10 + 5) + head 20 = 65; hits 2 layers x (2 + 2 x 10) = 44; no hybrid executor: no host
    p = predict(TOY, TOY_HW, "gpu")
    assert ms(p) == pytest.approx(0.109)
    assert p.decode_ms["gpu_dense"] == pytest.approx(0.065)
    assert p.decode_ms["gpu_experts"] == pytest.approx(0.044)
    assert p.cpu_ms == 0 and p.decode_ms["host"] == 0


def test_cpu_moe_waits_for_every_layer():
    # per layer: post 3 + CPU call 50 + 2 x 20 = 90 (nothing overlaps it) + handoff 4 = 97; x 2 + 65 = 259;
    # the hybrid executor's bookkeeping 100 between steps -> 359 (deferred: max(259, 100) = 259)
    p = predict(TOY, TOY_HW, "cpu-moe", deferred_host=False)
    assert ms(p) == pytest.approx(0.359) and p.cpu_ms == pytest.approx(0.180)
    assert p.decode_ms["cpu_wait"] == pytest.approx(0.180) and p.decode_ms["handoff"] == pytest.approx(0.008)
    assert p.decode_ms["post"] == pytest.approx(0.006) and p.decode_ms["host"] == pytest.approx(0.100)
    assert ms(predict(TOY, TOY_HW, "cpu-moe")) == pytest.approx(0.259)
    # n-cpu-moe:1: layer 0 as above (97), layer 1 all resident (22): 65 + 119 + 100 = 284
    assert ms(predict(TOY, TOY_HW, "n-cpu-moe:1", deferred_host=False)) == pytest.approx(0.284)


def test_hot_layer_expectation_over_the_misses():
    # h = 0.5, K = 2: P(n) = .25 / .5 / .25.  Per layer: post 3 +
    #   n=0: hits(2) = 22                                              -> .25 x 22 = 5.5
    #   n=1: hits(1) = 12; CPU 50 + 20 = 70, overlaps 12: wait 58 + 4  -> .5 x 74  = 37
    #   n=2: hits(0) = 2 (launch); CPU 90: wait 88 + 4                 -> .25 x 94 = 23.5
    # = 69 per layer; 2 x 69 + 65 = 203; host 100 + window-lfu 150 -> 453 us
    p = predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, gpu_misses=0, deferred_host=False)
    assert ms(p) == pytest.approx(0.453)
    assert p.cpu_ms == pytest.approx(2 * (0.5 * 0.070 + 0.25 * 0.090))
    assert p.decode_ms["cpu_wait"] == pytest.approx(2 * (0.5 * 0.058 + 0.25 * 0.088))
    # the cache's default policy (auto) costs 50 us more; a named policy is charged its own figure
    assert ms(predict(TOY, TOY_HW, "cache:4", hit_rate=0.5, gpu_misses=0, deferred_host=False)) == \
        pytest.approx(0.503)
    assert ms(predict(TOY, TOY_HW, "cache:4", hit_rate=0.5, gpu_misses=0, deferred_host=False,
                      policy="window-lfu")) == pytest.approx(0.453)
    # deferred bookkeeping overlaps the device step: max(203, 250) = 250
    assert ms(predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, gpu_misses=0)) == pytest.approx(0.250)


def test_gpu_computed_misses():
    # Z = 1, the first miss (run 5's rule, share 1); the host-read kernel launches in every posting layer:
    # post 3 + 2;  n=0: 22 -> 5.5;  n=1: GPU reads it: hits(1) 12 + read 30 + 10 = 52, no CPU -> 26;
    # n=2: hits(0) 2 + read 40, CPU one expert 70 overlaps 42: wait 28 + 4 -> .25 x 74 = 18.5
    # = 55 per layer; 2 x 55 + 65 + 250 = 425
    p = predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, gpu_misses=1, gpu_share=1, deferred_host=False)
    assert ms(p) == pytest.approx(0.425) and p.decode_ms["gpu_misses"] == pytest.approx(2 * 0.75 * 0.040)
    assert p.cpu_ms == pytest.approx(2 * 0.25 * 0.070)
    # the engine's rule (one per 4 misses): two misses never give the GPU one; only the launches remain
    p4 = predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, gpu_misses=1, deferred_host=False)
    assert ms(p4) == pytest.approx(0.457)
    # the auto default is 0 (run 7: GPU reads measured slower than the CPU): no host-read launches at all
    auto = predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, deferred_host=False)
    assert ms(auto) == pytest.approx(ms(predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, gpu_misses=0,
                                                deferred_host=False)))
    assert auto.decode_ms["gpu_misses"] == 0


def test_large_experts_give_the_gpu_one_miss_per_two():
    # Mixtral's experts (88 MB >= 32 MiB) stream over PCIe: the engine takes one per 2 misses, so at K = 2
    # a layer with both experts missing gives the GPU one; Qwen3's 2.95 MB experts keep one per 4
    from hotexperts.trace.costmodel import engine_share

    mix = SHAPES["mixtral-8x7b"]
    assert engine_share(mix) == 2 and engine_share(QWEN) == 4
    hw = BUILTIN["h200"]
    auto = predict(mix, hw, "cpu-moe", gpu_misses=1)
    assert auto.decode_ms["gpu_misses"] > 0
    assert auto.decode_tps == pytest.approx(predict(mix, hw, "cpu-moe", gpu_misses=1, gpu_share=2).decode_tps)
    assert predict(mix, hw, "cpu-moe", gpu_misses=1, gpu_share=4).decode_ms["gpu_misses"] == 0


def test_copy_engine_bound():
    # 100 swaps x 6000 B / 0.6 GB/s = 1000 us of copies against 453 us of compute
    p = predict(TOY, TOY_HW, "hot:2", hit_rate=0.5, gpu_misses=0, deferred_host=False, swaps_per_token=100)
    assert ms(p) == pytest.approx(1.0) and p.decode_ms["copy"] == pytest.approx(1.0 - 0.453)
    # a per-swap host cost is bookkeeping: 100 x 10 us more host time
    hw = replace(TOY_HW, host_swap_s=10 * US)
    assert ms(predict(TOY, hw, "hot:2", hit_rate=0.5, gpu_misses=0, deferred_host=False,
                      swaps_per_token=100)) == pytest.approx(1.453)


def test_cpu_scale_multiplies_cpu_calls():
    p = predict(TOY, TOY_HW, "cpu-moe", deferred_host=False, cpu_scale=2.0)
    assert p.cpu_ms == pytest.approx(0.360) and ms(p) == pytest.approx(0.359 + 0.180)


def test_per_layer_hits_and_bad_lengths():
    both = predict(TOY, TOY_HW, "hot:2", layer_hit=[1.0, 0.0], gpu_misses=0, deferred_host=False)
    # layer 0: post 3 + hits(2) 22 = 25; layer 1: post 3 + hits(0) 2 + wait 88 + 4 = 97 -> 65 + 122 + 250
    assert ms(both) == pytest.approx(0.437)
    with pytest.raises(HotExpertsError, match="per-layer hit rates"):
        predict(TOY, TOY_HW, "hot:2", layer_hit=[1.0])


# ---- sanity on the built-in profiles ------------------------------------------------------------------
@pytest.mark.parametrize("hw", list(BUILTIN.values()), ids=list(BUILTIN))
def test_all_gpu_beats_all_cpu(hw):
    gpu, cpu = predict(QWEN, hw, "gpu"), predict(QWEN, hw, "cpu-moe")
    assert gpu.decode_tps > 2 * cpu.decode_tps and gpu.prompt_tps > cpu.prompt_tps
    assert gpu.vram_gb > 50 > 3 > cpu.vram_gb
    assert cpu.decode_ms["cpu_wait"] > 0 and cpu.decode_ms["post"] > 0 and gpu.decode_ms["post"] == 0
    assert cpu.cpu_ms > 0 == gpu.cpu_ms


@pytest.mark.parametrize("hw", list(BUILTIN.values()), ids=list(BUILTIN))
def test_monotone_in_hit_rate_and_layers(hw):
    rates = (0.0, 0.3, 0.6, 0.8, 0.9) + ((0.95, 1.0) if hw.name != "rtx3060-ddr4" else ())
    # (on the 3060 a few int8 CPU misses in parallel with the slow bf16 GPU beat h = 1: docs/simulator.md)
    tps = [predict(QWEN, hw, "hot:32", hit_rate=h, gpu_misses=0).decode_tps for h in rates]
    assert tps == sorted(tps) and tps[0] < tps[-1]
    # (with GPU-computed misses the one-per-4 rule can make a lower hit rate a little faster: a layer with
    # 4 misses gives the GPU one; the engine has the same threshold)
    layers = [predict(QWEN, hw, f"n-cpu-moe:{n}") for n in (0, 16, 32, 48)]
    assert [p.decode_tps for p in layers] == sorted((p.decode_tps for p in layers), reverse=True)
    assert [p.vram_gb for p in layers] == sorted((p.vram_gb for p in layers), reverse=True)
    # a cache that never hits is cpu-moe plus an empty slot kernel (hidden behind the CPU): never faster
    assert predict(QWEN, hw, "hot:32", hit_rate=0.0, gpu_misses=0, deferred_host=False).decode_tps < \
        predict(QWEN, hw, "cpu-moe", deferred_host=False).decode_tps
    # ... and with every expert a miss the GPU's share (2 of 8 read over PCIe) shortens the CPU's part
    assert predict(QWEN, hw, "cpu-moe", gpu_misses=2).cpu_ms < predict(QWEN, hw, "cpu-moe").cpu_ms


def test_copies_cost_only_beyond_compute():
    hw = BUILTIN["h200"]
    base = predict(QWEN, hw, "hot:32", hit_rate=0.8)
    few = predict(QWEN, hw, "hot:32", hit_rate=0.8, swaps_per_token=1)
    many = predict(QWEN, hw, "hot:32", hit_rate=0.8, swaps_per_token=500)
    assert few.decode_tps == base.decode_tps > many.decode_tps and many.decode_ms["copy"] > 0


def test_h200_matches_run7():
    """The h200 profile (refitted on run 7) against run 7's measurements (docs/simulator.md)."""
    from hotexperts.bench.predict import shape_for

    hw, q4 = BUILTIN["h200"], shape_for("qwen3-30b-a3b", "int4")
    run7 = dict(deferred_host=True, gpu_misses=0)
    assert predict(q4, hw, "gpu").decode_tps == pytest.approx(161.1, rel=0.02)
    assert predict(q4, hw, "cpu-moe", **run7).decode_tps == pytest.approx(54.3, rel=0.05)
    assert predict(q4, hw, "n-cpu-moe:15", **run7).decode_tps == pytest.approx(100.6, rel=0.05)
    assert predict(q4, hw, "cpu-moe", **run7).cpu_ms == pytest.approx(13.4, rel=0.05)
    assert hw.label == "fitted" and "fit" in hw.sources and hw.sources["command"].startswith("python scripts")


def test_h200_run5_matches_run5():
    """The run-5 fit, kept as 'h200-run5', against run 5."""
    from hotexperts.bench.predict import shape_for

    hw, q4 = BUILTIN["h200-run5"], shape_for("qwen3-30b-a3b", "int4")
    run5 = dict(deferred_host=False, gpu_share=1)
    assert predict(q4, hw, "gpu").decode_tps == pytest.approx(121.7, rel=0.02)
    assert predict(q4, hw, "cpu-moe", **run5).decode_tps == pytest.approx(35.2, rel=0.05)
    assert predict(q4, hw, "n-cpu-moe:15", **run5).decode_tps == pytest.approx(65.8, rel=0.05)
    assert predict(q4, hw, "n-cpu-moe:15", gpu_misses=1, **run5).decode_tps == pytest.approx(70.6, rel=0.05)
    assert predict(q4, hw, "cpu-moe", **run5).cpu_ms == pytest.approx(20.9, rel=0.05)
    assert hw.label == "fitted" and "fit" in hw.sources and hw.sources["command"].startswith("python scripts")


def test_errors_and_shapes():
    with pytest.raises(HotExpertsError, match="hit rate"):
        predict(QWEN, BUILTIN["h200"], "hot:16")
    with pytest.raises(HotExpertsError, match="unknown placement"):
        predict(QWEN, BUILTIN["h200"], "disk")
    with pytest.raises(HotExpertsError, match="unknown hardware"):
        get_profile("tpu")
    t = random_trace(n=20)
    assert shape_for_trace(t) is None
    s = shape_for_trace(t, expert_mb=9.4)
    assert abs(s.expert_bytes_gpu - 9.4e6) < 0.01e6 and s.num_moe_layers == t.num_layers
    assert replace(QWEN, gpu_bytes_per_param=0.625).gpu_format == "int4"
    assert replace(QWEN, gpu_bytes_per_param=1.004).gpu_format == "int8"


def test_predict_cache_from_simulation():
    t = random_trace(n=60, lm=3)
    r = simulate(t, "lru", slots=4)
    shape = shape_for_trace(t, "qwen3-30b-a3b")
    p = predict_cache(shape, BUILTIN["rtx4090-7950x"], r)
    assert p.decode_tps > predict(shape, BUILTIN["rtx4090-7950x"], "cpu-moe").decode_tps


def test_hardware_json_roundtrip(tmp_path):
    hw = BUILTIN["rtx3060-ddr4"]
    path = save_hardware(tmp_path / "hw.json", hw)
    assert load_hardware(path) == hw and get_profile(str(path)) == hw
    h2 = BUILTIN["h200"]
    assert load_hardware(save_hardware(tmp_path / "h200.json", h2)) == h2
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(HotExpertsError, match="not a hotexperts hardware"):
        get_profile(str(tmp_path / "bad.json"))
    # an older calibrated JSON (a plain number for the policy bookkeeping) still loads and predicts
    old = tmp_path / "old.json"
    old.write_text('{"format": "hotexperts-hardware", "version": 1, "name": "x", "host_policy_s": 0.001}')
    assert get_profile(str(old)).policy_seconds("lru") == 0.001
    assert BUILTIN["h200"].policy_seconds("decay") == max(BUILTIN["h200"].host_policy_s.values())
