"""The expert quantization vocabulary (hotexperts/formats.py): one list of names that quant.py produces, the
placement grammar and the CLI accept, and whose sizes match what the quantizers really store."""

import subprocess
import sys

import pytest
import torch

from hotexperts import formats
from hotexperts.cli import build_parser
from hotexperts.errors import PlacementError
from hotexperts.experts.placement import Placement
from hotexperts.quant import quantize_layer
from hotexperts.trace.real_shape import shape_for
from hotexperts.weights import LayerExperts, QuantizedWeight


def quantized(fmt: str, rows: int = 4, cols: int = 1024) -> QuantizedWeight:
    """w13 [1, rows, cols] of a layer quantized to `fmt` (w2 [1, cols, 256]: every block size divides)."""
    g = torch.Generator().manual_seed(0)
    layer = LayerExperts(torch.randn(1, rows, cols, generator=g), torch.randn(1, cols, 256, generator=g))
    return quantize_layer(layer, fmt).w13


@pytest.mark.parametrize("fmt", formats.STORE_FORMATS)
def test_every_store_format_is_what_quant_produces_at_the_size_the_vocabulary_says(fmt):
    qw = quantized(fmt)
    assert isinstance(qw, QuantizedWeight) and qw.fmt == fmt
    assert qw.nbytes / (4 * 1024) == pytest.approx(formats.BYTES_PER_WEIGHT[fmt])


def test_the_names_the_user_types_map_onto_store_formats_and_the_cli_offers_them():
    assert set(formats.EXPERT_QUANT.values()) - {None} <= set(formats.STORE_FORMATS)
    assert set(formats.EXPERT_QUANT_CHOICES) <= set(formats.EXPERT_QUANT)
    assert set(formats.STORE_FORMATS) <= set(formats.QUANTIZE_FORMATS)
    assert quantized("int4").fmt == formats.EXPERT_QUANT["int4"]
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("generate", "serve", "trace", "bench"):
        action = next(a for a in sub[command]._actions if "--expert-quant" in a.option_strings)
        assert tuple(action.choices) == formats.EXPERT_QUANT_CHOICES, command
        assert action.help == formats.expert_quant_help()


@pytest.mark.parametrize("name", list(formats.EXPERT_QUANT))
def test_placement_and_the_real_shape_accept_every_name(name):
    assert Placement(expert_quant=name).expert_quant == name
    shape = shape_for("preset:qwen3-30b-a3b-mini", name)
    fmt = formats.EXPERT_QUANT[name]
    assert shape.gpu_bytes_per_param == (formats.BYTES_PER_WEIGHT[fmt] if fmt else 2.0)


def test_an_unknown_name_is_refused_with_the_choices():
    with pytest.raises(PlacementError, match="none, int8, int4, int8g, q4_k, got 'int3'"):
        Placement(expert_quant="int3")


def test_memcheck_keeps_its_own_table_but_it_agrees():
    """engine/memcheck.py (owned elsewhere for now) still spells the sizes out: they must not drift."""
    from hotexperts.engine.memcheck import FORMAT_BYTES
    assert FORMAT_BYTES == {f: formats.BYTES_PER_WEIGHT[f] for f in FORMAT_BYTES}


def test_the_vocabulary_imports_no_torch():
    code = "import sys, hotexperts.formats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
