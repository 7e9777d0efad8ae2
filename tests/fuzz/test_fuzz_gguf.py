"""Fuzz: >= 1,000 deterministic mutations of a tiny-qwen3-moe Q4_K GGUF (make-model's file), each loaded in a
worker process (timeout, capped address space). Pass: every mutated file is refused with one error line
naming the file, or loads and gives the original's logits bit for bit; no traceback, hang or blow-up.
`PYTHONPATH=. python tests/fuzz/test_fuzz_gguf.py` prints the table by class."""

from __future__ import annotations

import collections
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gguf_mutations import GGUFParts, mutations  # noqa: E402
from worker import FAILURES, OUTCOMES, Loader, classify  # noqa: E402

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


def report(table) -> str:
    rows = [f"{'class':<14}" + "".join(f"{o:>22}" for o in OUTCOMES)]
    for cls, counts in table.items():
        rows.append(f"{cls:<14}" + "".join(f"{counts[o]:>22}" for o in OUTCOMES))
    total = collections.Counter()
    for counts in table.values():
        total.update(counts)
    rows.append(f"{'total':<14}" + "".join(f"{total[o]:>22}" for o in OUTCOMES)
                + f"   ({sum(total.values())})")
    return "\n".join(rows)


def test_fuzz_gguf(tmp_path):
    table, findings = run(tmp_path)
    print(report(table))
    assert sum(sum(c.values()) for c in table.values()) >= 1000
    assert not findings, "\n".join(map(str, findings[:20]))


if __name__ == "__main__":
    import tempfile

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        table, findings = run(Path(d))
    print(report(table))
    for f in findings:
        print(*f, sep="  |  ")
    print(f"{time.monotonic() - t0:.1f} s")
