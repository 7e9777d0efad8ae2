"""engine/memcheck.py: RAM and VRAM need vs available, checked before any big allocation (issue 19)."""

import pytest
import torch

import hotexperts.engine.engine as engine_mod
import hotexperts.engine.memcheck as mc
from hotexperts.cli import main
from hotexperts.engine.engine import dense_bytes, kv_bytes
from hotexperts.engine.presets import build_in_memory
from hotexperts.errors import HotExpertsError
from hotexperts.experts.budget import GiB
from hotexperts.experts.placement import Placement

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = "preset:tiny-qwen3-moe"


def test_need_of_a_preset_is_what_loading_it_takes():
    need = mc.memory_need(TINY, torch.float32, CPU, max_context=64)
    lm = build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")
    experts = sum(t.numel() * t.element_size() for l in lm.store.layers
                  for t in (lm.store.layer(l).w13, lm.store.layer(l).w2))
    assert need.experts == experts and need.dense == dense_bytes(lm.model)
    assert need.kv == kv_bytes(lm.cfg, 64, torch.float32)
    assert need.ram == need.experts + need.dense + need.kv and need.vram == 0


def test_on_cuda_experts_count_in_ram_and_the_placement_decides_the_vram():
    big = "preset:qwen3-30b-a3b"
    all_gpu = mc.memory_need(big, torch.bfloat16, CUDA, Placement())
    assert all_gpu.ram == all_gpu.experts and all_gpu.vram == all_gpu.dense + all_gpu.kv + all_gpu.experts
    assert mc.memory_need(big, torch.bfloat16, CUDA, Placement.parse("cpu")).gpu_experts == 0
    assert mc.memory_need(big, torch.bfloat16, CUDA, Placement.parse("layers:40")).gpu_experts == \
        8 * all_gpu.layer_experts
    assert mc.memory_need(big, torch.bfloat16, CUDA, Placement.parse("cache:8GiB")).gpu_experts == 8 * GiB
    budgeted = Placement.parse("cache:auto")
    assert mc.memory_need(big, torch.bfloat16, CUDA, budgeted).gpu_experts == 0
    int4 = mc.memory_need(big, torch.bfloat16, CPU, expert_format="int4g32")
    assert int4.experts == pytest.approx(all_gpu.experts * 0.625 / 2, rel=1e-3)


def test_too_little_ram_is_one_error_with_suggestions():
    need = mc.memory_need("preset:qwen3-30b-a3b", torch.bfloat16, CPU)
    message = (r"not enough RAM to load preset:qwen3-30b-a3b: it needs 57\.2 GiB \(experts 54\.0 GiB \+ "
               r"dense .*has 16\.0 GiB available.*-mini")
    with pytest.raises(HotExpertsError, match=message):
        mc.check_memory(need, ram=16 * GiB, vram=None)
    mc.check_memory(need, ram=64 * GiB, vram=None)                  # fits: nothing raised


def test_too_little_vram_suggests_how_many_layers_to_move():
    need = mc.memory_need("preset:qwen3-30b-a3b", torch.bfloat16, CUDA, Placement())
    free = need.vram - 10 * need.layer_experts + 1
    with pytest.raises(HotExpertsError, match=r"free VRAM.*--n-cpu-moe 10 .*--moe-cache SIZE"):
        mc.check_memory(need, ram=None, vram=free)
    with pytest.raises(HotExpertsError, match="even with every expert on the CPU the dense part"):
        mc.check_memory(need, ram=None, vram=need.dense // 2)


def test_n_sequence_slots_and_verify_steps_count_in_the_vram():
    big = "preset:qwen3-30b-a3b"
    one = mc.memory_need(big, torch.bfloat16, CUDA, Placement(), max_context=1024)
    many = mc.memory_need(big, torch.bfloat16, CUDA, Placement(), max_context=1024, parallel=8,
                          verify_tokens=9, expert_format="q4_k")
    assert one.steps == 0 and many.kv == 8 * one.kv
    steps = mc.feature_bytes(one_cfg(big), torch.bfloat16, 1024, parallel=8, verify_tokens=9,
                             quantized_cuda=True)
    assert set(steps) == {"verify", "batch"} and many.steps == sum(steps.values())
    assert steps["verify"] > mc.DEQUANT_CHUNK_BYTES and steps["batch"] >= mc.ALLOCATOR_SLACK
    assert many.vram - many.gpu_experts == many.dense + 8 * one.kv + many.steps
    with pytest.raises(HotExpertsError, match=r"KV cache .* \+ batched/verify steps .*fewer -np slots"):
        mc.check_memory(many, ram=None, vram=many.dense)
    with pytest.raises(HotExpertsError, match=r"sequence slots \(-np/--parallel\) must be >= 1"):
        mc.feature_bytes(one_cfg(big), torch.bfloat16, 1024, parallel=0)


def test_feature_bytes_counts_each_graph_pool_and_its_streams():
    cfg = one_cfg("preset:tiny-qwen3-moe")
    assert mc.feature_bytes(cfg, torch.float32, 64) == {}
    decode = mc.feature_bytes(cfg, torch.float32, 64, graphs=True)["graphs"]
    assert decode == mc.ALLOCATOR_SLACK + 2 * mc.CUBLAS_STREAM_BYTES           # T=1: a warm-up + capture
    verify = mc.feature_bytes(cfg, torch.float32, 64, graphs=True, verify_tokens=4)["graphs"]
    assert verify == 2 * mc.ALLOCATOR_SLACK + 5 * mc.CUBLAS_STREAM_BYTES        # + T = 2, 3, 4 buckets
    no_workspace = mc.feature_bytes(cfg, torch.float32, 64, graphs=True, cublas_stream=0)["graphs"]
    assert no_workspace == mc.ALLOCATOR_SLACK
    most = mc.feature_bytes(cfg, torch.float32, 64, graphs=True, verify_tokens=1000)["graphs"]
    assert most == 2 * mc.ALLOCATOR_SLACK + mc.CAPTURE_STREAMS_MAX * mc.CUBLAS_STREAM_BYTES


def one_cfg(source: str):
    return mc._config(source)


def test_gguf_need_is_read_from_its_tensor_table(tmp_path):
    from hotexperts.engine.gguf_export import write_gguf

    lm = build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")
    (path,) = write_gguf(lm, tmp_path / "t.gguf", "q8_0")
    need = mc.memory_need(str(path), torch.float32, CPU)
    assert 0 < need.experts < path.stat().st_size and need.experts + need.dense <= path.stat().st_size
    assert need.layer_experts * len(lm.cfg.moe_layers) == need.experts


def test_unreadable_sources_are_left_to_the_loader(tmp_path):
    assert mc.memory_need(str(tmp_path / "nope"), torch.float32, CPU) is None
    assert mc.memory_need("preset:nope", torch.float32, CPU) is None


def test_available_ram_reads_meminfo(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    monkeypatch.setattr(mc, "MEMINFO", tmp_path / "meminfo")
    assert mc.available_ram() == 2048 * 1024
    monkeypatch.setattr(mc, "MEMINFO", tmp_path / "missing")
    assert mc.available_ram() is None


def test_generate_refuses_before_loading_anything(monkeypatch, capsys):
    monkeypatch.setattr(mc, "available_ram", lambda: 1024)
    monkeypatch.setattr(engine_mod, "load_source", lambda *a, **k: pytest.fail("loaded despite no RAM"))
    rc = main(["generate", "-m", TINY, "-p", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: not enough RAM to load preset:tiny-qwen3-moe") and \
        "Traceback" not in err


def test_bench_refuses_before_building_the_model(monkeypatch, capsys):
    import hotexperts.cli.bench as bench

    monkeypatch.setattr(mc, "available_ram", lambda: 1024)
    monkeypatch.setattr(bench, "build_in_memory", lambda *a, **k: pytest.fail("built despite no RAM"))
    rc = main(["bench", "--device", "cpu", "--expert-quant", "int4", "--tests", "tg1", "--repeats", "1"])
    assert rc == 2 and "not enough RAM to load preset:qwen3-30b-a3b-mini" in capsys.readouterr().err
