"""bench/report.py: the plans under the table carry each placement's VRAM breakdown and what was measured."""

from hotexperts.bench.report import _plans


def _result(**kw):
    base = {"label": "cpu-moe", "plan": "all=cpu", "staging": "staging 2 pools x 44 experts",
            "dequant_chunk": 4, "vram_plan_gib": {"total": 2.2, "context": 0.5, "dense": 1.23, "kv": 0.06,
                                                  "workspace": 0.2, "staging": 0.21, "slots": 0.0}}
    return base | kw


def test_plans_print_the_breakdown_staging_and_measured_parts():
    text = _plans([_result(peak_process_gib=2.15, context_after_gib=0.61, allocator_slack_gib=0.05)])
    assert "- cpu-moe: all=cpu; staging 2 pools x 44 experts; dequantize chunk 4 experts" in text
    assert ("VRAM GiB 2.20 = context 0.50 + dense 1.23 + kv 0.06 + workspace 0.20 + staging 0.21 + "
            "slots 0.00") in text
    assert "measured GiB: process peak 2.15, context after 0.61, allocator slack 0.05" in text


def test_a_placement_without_budget_sums_its_parts():
    vram = {"total": None, "dense": 1.0, "kv": 0.5, "workspace": 0.25, "staging": 0.0, "slots": 2.0}
    text = _plans([_result(label="gpu", plan="all=gpu", staging="no prompt staging (every expert resident)",
                           dequant_chunk=0, vram_plan_gib=vram)])
    assert "VRAM GiB (no budget) 3.75 = dense 1.00" in text and "dequantize" not in text
    assert "measured" not in text and _plans([_result(plan=None)]) == ""
