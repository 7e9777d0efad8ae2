"""`hotexperts make-model` flags (cli/make_model.py): --quant's help lists every expert type the GGUF writer
takes (engine/gguf_export.QUANTS and q4_k_m), the LUT4 ones included."""

from hotexperts.cli import build_parser
from hotexperts.engine.gguf_export import QUANTS

SUBPARSERS = next(a for a in build_parser()._actions if a.dest == "command").choices


def test_quant_help_lists_every_type_the_writer_takes():
    quant = next(a for a in SUBPARSERS["make-model"]._actions if a.dest == "quant")
    listed = quant.help.split(":", 1)[1].split("(")[0].split()
    assert sorted(listed) == sorted([*QUANTS, "q4_k_m"])
    assert "iq4_nl" in listed and "iq4_xs" in listed
