"""Fuzz: >= 1,000 deterministic mutations of a tiny-qwen3-moe Q4_K GGUF (make-model's file), each loaded in a
worker process (timeout, capped address space). Pass: every mutated file is refused with one error line
naming the file, or loads and gives the original's logits bit for bit; no traceback, hang or blow-up.
`PYTHONPATH=. python tests/fuzz/test_fuzz_gguf.py` prints the table by class."""

from __future__ import annotations

import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gguf_mutations import GGUFParts, mutations  # noqa: E402
from worker import FAILURES, Loader, check_suite, classify, main  # noqa: E402

SEED = 18


def make_original(out: Path) -> Path:
    from hotexperts.engine.gguf_export import write_gguf
    from hotexperts.engine.presets import build_in_memory

    return write_gguf(build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu"), out, "q4_k")[0]


def run(tmp: Path, seed: int = SEED):
    original = make_original(tmp / "original.gguf")
    g = GGUFParts.read(original)
    assert g.to_bytes() == original.read_bytes()
    table, findings = collections.defaultdict(collections.Counter), []
    path = tmp / "mutant.gguf"
    with Loader() as load:
        outcome, reference = load("gguf", original)
        assert outcome == "loaded", reference
        for cls, label, data in mutations(g, original, random.Random(seed)):
            path.write_bytes(data)
            result = classify(*load("gguf", path), reference, (path.name,))
            table[cls][result] += 1
            if result in FAILURES:
                findings.append((cls, label, result))
    return table, findings


def test_fuzz_gguf(tmp_path):
    check_suite(*run(tmp_path), at_least=1000)


if __name__ == "__main__":
    main(run)
