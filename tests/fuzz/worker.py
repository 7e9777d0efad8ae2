"""A model-loading worker process for the fuzz suite, and the outcome classes.

    with Loader(timeout=20) as run:           # one spawned process, 1 torch thread, address space capped
        outcome, detail = run("gguf" | "hf", path)

outcome: "error" (a HotExpertsError: detail is its message), "loaded" (detail: the logits of FIXED_IDS as
bytes), "traceback" (any other exception: detail is the traceback), "blow-up" (MemoryError, an allocator
failure, or the worker killed), "hang" (no answer within the timeout: the worker is killed and restarted).

    check_suite(table, findings, at_least)    the suites' pass condition: enough mutations, no failure class
    main(run)                                 a suite run by hand: its table, findings and time
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path

FIXED_IDS = [1, 5, 9, 300, 1000, 7, 8, 9, 77, 512]
MEMORY_CAP = 3 * 2**30          # bytes of address space the worker may add to what it holds after imports


def _logits(lm):
    import torch

    from hotexperts.experts.reference import DenseExecutor

    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, torch.device("cpu"), torch.float32)
    ids = torch.tensor([i % lm.cfg.vocab_size for i in FIXED_IDS])
    with torch.inference_mode():
        return lm.model(ids, torch.arange(len(ids)), lm.model.new_kv_cache(len(ids)), ex).float()


def _one(kind: str, path: str):
    from hotexperts.engine.load import load_model
    from hotexperts.engine.load_gguf import load_gguf
    from hotexperts.errors import HotExpertsError

    try:
        lm = load_gguf(path, dtype="float32", device="cpu") if kind == "gguf" else \
            load_model(path, dtype="float32", device="cpu", progress=False)
        return "loaded", _logits(lm).numpy().tobytes()
    except HotExpertsError as e:
        return "error", str(e)
    except MemoryError:
        return "blow-up", traceback.format_exc()[-1500:]
    except RuntimeError as e:
        kind = "blow-up" if "allocate" in str(e) or "out of memory" in str(e) else "traceback"
        return kind, traceback.format_exc()[-1500:]
    except BaseException:  # noqa: BLE001  (the fuzz's point: anything else is a finding)
        return "traceback", traceback.format_exc()[-1500:]


def _serve(conn) -> None:
    import resource
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import hotexperts.engine.load_gguf  # noqa: F401  (imports before the cap)

    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_CAP, resource.RLIM_INFINITY))
    conn.send("ready")
    while (task := conn.recv()) is not None:
        conn.send(_one(*task))


OUTCOMES = ("clean error", "error not naming the file", "loaded, same logits", "traceback", "hang",
            "blow-up", "loaded and wrong")
FAILURES = ("error not naming the file", "traceback", "hang", "blow-up", "loaded and wrong")


def classify(outcome: str, detail, reference: bytes, names: tuple[str, ...]) -> str:
    """One of OUTCOMES. An error must be one line naming the file or directory (any of `names`); a
    loaded model must give the original's logits bit for bit (so also never NaN)."""
    if outcome == "error":
        ok = "\n" not in detail and any(n in detail for n in names)
        return "clean error" if ok else "error not naming the file"
    if outcome == "loaded":
        return "loaded, same logits" if detail == reference else "loaded and wrong"
    return outcome


class Loader:
    def __init__(self, timeout: float = 20.0):
        self.timeout, self.proc, self.conn = timeout, None, None
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
            self.proc = None
            self.restarts += 1

    def __enter__(self):
        self._start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
        self._stop()

    def __call__(self, kind: str, path) -> tuple[str, object]:
        self.conn.send((kind, str(path)))
        try:
            if self.conn.poll(self.timeout):
                return self.conn.recv()
            outcome = ("hang", f"no answer in {self.timeout} s")
        except EOFError:
            outcome = ("blow-up", f"the worker died (exit code {self.proc.exitcode})")
        self._stop()
        self._start()
        return outcome


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


def check_suite(table, findings, at_least: int) -> None:
    print(report(table))
    assert sum(sum(c.values()) for c in table.values()) >= at_least
    assert not findings, "\n".join(map(str, findings[:20]))


def main(run) -> None:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        table, findings = run(Path(d))
    print(report(table))
    for f in findings:
        print(*f, sep="  |  ")
    print(f"{time.monotonic() - t0:.1f} s")
