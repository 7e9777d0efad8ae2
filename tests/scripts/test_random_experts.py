"""scripts/random_experts.py, the weights both CPU MoE benchmarks build: every format at its shapes, seeded,
clones with their own storage; the two scripts import it."""

import importlib

import pytest
import torch

from hotexperts.quant import dequantize
from scripts.random_experts import clone_layer, random_layer

FORMATS = ["int4g32", "int8", "int8g32", "int8g16", "int8g16z", "mxfp4", "iq4_nl", "iq4_xs", "bf16"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_has_the_expert_shapes_and_is_seeded(fmt):
    E, D, I = 2, 256, 256                                        # iq4_xs: blocks of 256
    a = random_layer(fmt, E, D, I, torch.Generator().manual_seed(3))
    b = random_layer(fmt, E, D, I, torch.Generator().manual_seed(3))
    w13, w2 = dequantize(a.w13, torch.float32), dequantize(a.w2, torch.float32)
    assert w13.shape == (E, 2 * I, D) and w2.shape == (E, D, I)
    assert torch.isfinite(w13).all() and w13.abs().max() > 0
    torch.testing.assert_close(dequantize(b.w13, torch.float32), w13, rtol=0, atol=0)
    if fmt != "bf16":
        assert a.w13.fmt == fmt[:7] and (a.w13.zero is not None) == (fmt in ("int4g32", "int8g16z"))


@pytest.mark.parametrize("fmt", ["int4g32", "iq4_nl", "bf16"])
def test_a_clone_has_its_own_storage(fmt):
    a = random_layer(fmt, 2, 256, 256, torch.Generator().manual_seed(0))
    c = clone_layer(a)
    qa, qc = (w.q if fmt != "bf16" else w for w in (a.w13, c.w13))
    assert torch.equal(qa, qc) and qa.data_ptr() != qc.data_ptr()


@pytest.mark.parametrize("script", ["scripts.bench_cpu_micro", "scripts.bench_cpu_moe"])
def test_the_benchmarks_import_it(script):
    assert importlib.import_module(script).random_layer is random_layer
