"""The VRAM plan at the real Qwen3-30B-A3B shape (Q4_K experts, Q8_0 dense, host embedding), no weights:
stock llama.cpp's --cpu-moe VRAM (2212 MiB, run 20) runs, and a budget that holds everything is all-GPU."""

import pytest
import torch

from hotexperts.engine.engine import workspace_bytes
from hotexperts.engine.presets import preset_config
from hotexperts.engine.vram_plan import dense_gpu_bytes, shape_plan
from hotexperts.errors import HotExpertsError
from hotexperts.experts.budget import GiB, MiB
from hotexperts.experts.solve import MIN_DEQUANT_CHUNK
from hotexperts.models import get_arch

SHAPE = "qwen3-30b-a3b"
CONTEXT = int(0.5 * GiB)              # the CUDA context, measured 0.52-0.55 GiB on the H100 (run 20)
CTX = 640                             # pp512 + tg128 tokens, as the bench's stock comparison


def _cfg():
    hf = preset_config(SHAPE)
    return get_arch(hf["model_type"]).config_from_hf(hf)


def _parts_sum(plan) -> int:
    return sum(v for k, v in plan.vram.items() if k != "total")


def test_dense_weights_match_the_measured_h100_run():
    """Q8_0 projections + bf16 norms and routers, embedding on the host: run 20 measured 1.23 GiB."""
    assert dense_gpu_bytes(_cfg()) / GiB == pytest.approx(1.23, abs=0.01)
    assert dense_gpu_bytes(_cfg(), dense_format="none") > 1.8 * dense_gpu_bytes(_cfg())   # bf16: 2/1.0625
    with pytest.raises(HotExpertsError, match="dense format must be one of"):
        dense_gpu_bytes(_cfg(), dense_format="q3")


@pytest.mark.parametrize("budget", [2.2 * GiB, 2212 * MiB])
@pytest.mark.parametrize("text", ["cpu", "layers:auto", "cache:auto"])
def test_stock_cpu_moe_vram_gives_a_plan_under_the_budget(text, budget):
    plan = shape_plan(SHAPE, text, budget=int(budget), context=CONTEXT, max_context=CTX)
    assert set(plan.vram) == {"total", "context", "dense", "kv", "workspace", "staging", "slots"}
    assert _parts_sum(plan) <= plan.vram["total"] == int(budget)
    assert plan.vram["context"] == CONTEXT
    if text == "cpu":
        assert plan.layers("cpu") == list(_cfg().moe_layers) and plan.vram["slots"] == 0
    # prompt batches still run on the GPU: smaller prompt chunks leave two pools of a part of a layer room
    assert plan.staging.pools == 2 and 16 <= plan.staging.experts < 128 and plan.prefill_chunk in (128, 256)
    assert plan.dequant_chunk >= 4


def test_a_bigger_context_leaves_no_staging_and_the_plan_says_prompts_take_the_hybrid_path():
    plan = shape_plan(SHAPE, "cpu", budget=int(2.2 * GiB), context=int(0.65 * GiB), max_context=CTX)
    assert not plan.staging and plan.staging.tight and "hybrid path" in plan.describe()
    assert _parts_sum(plan) <= plan.vram["total"] and plan.prefill_chunk in (128, 256)   # 512: no plan
    with pytest.raises(HotExpertsError, match="smaller than the CUDA context, dense weights"):
        shape_plan(SHAPE, "cpu", budget=int(2.2 * GiB), context=int(0.8 * GiB), max_context=CTX)


def test_a_budget_that_holds_every_expert_is_all_gpu_without_staging():
    budget = 18 * GiB                                          # 15.19 GiB of Q4_K experts + the rest
    for text in ("layers:auto", "gpu", "cache:auto", "hot:auto"):
        plan = shape_plan(SHAPE, text, budget=budget, context=CONTEXT, max_context=CTX)
        assert plan.num_slots(128) == 48 * 128 or plan.dense, text
        assert not plan.staging and plan.staging.why == "every expert resident" and plan.vram["staging"] == 0
        assert plan.layers("cpu") == [] and _parts_sum(plan) <= budget


def test_where_everything_barely_fits_the_dequantize_chunk_shrinks_rather_than_a_layer_going_to_the_cpu():
    big = shape_plan(SHAPE, "layers:auto", budget=18 * GiB, context=CONTEXT, max_context=CTX)
    per = 2 * _cfg().expert_params                                   # one expert dequantized in bf16
    every = _parts_sum(big) - big.dequant_chunk * per                # all experts, no dequantize chunk
    tight = shape_plan(SHAPE, "layers:auto", budget=every + MIN_DEQUANT_CHUNK * per, context=CONTEXT,
                       max_context=CTX)
    assert big.dequant_chunk > MIN_DEQUANT_CHUNK
    assert tight.layers("cpu") == [] and tight.dequant_chunk == MIN_DEQUANT_CHUNK
    short = shape_plan(SHAPE, "layers:auto", budget=every + MIN_DEQUANT_CHUNK * per - 1, context=CONTEXT,
                       max_context=CTX)
    assert short.layers("cpu") == [0]                                # one byte less: a layer on the CPU


def test_workspace_follows_the_prompt_chunk_and_context():
    cfg = _cfg()
    assert workspace_bytes(cfg, torch.bfloat16, 128, CTX) < workspace_bytes(cfg, torch.bfloat16, 512, CTX)
    assert workspace_bytes(cfg, torch.bfloat16, 512, 4096) > workspace_bytes(cfg, torch.bfloat16, 512, CTX)


def test_bad_formats_are_clear_errors():
    with pytest.raises(HotExpertsError, match="expert format must be one of"):
        shape_plan(SHAPE, "cpu", budget=None, context=0, max_context=CTX, expert_format="q2")
