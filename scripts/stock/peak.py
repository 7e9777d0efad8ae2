"""Run one command and record its peak GPU memory as nvidia-smi reports it (CUDA context included).

    python3 scripts/stock/peak.py --out PEAK.json [--stdout FILE] [--timeout S] [--interval 0.2] -- CMD ARG...

Contract: starts CMD (its stdout goes to --stdout, else to ours; stderr to ours), and every --interval seconds
until it exits polls `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` and
`nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits`. Writes PEAK.json:
    peak_mib          max over samples of the used_memory summed over CMD's process tree (the method the
                      stock/ours comparison uses for both processes); null when nvidia-smi never listed one
                      of its pids (e.g. a PID namespace that hides them)
    device_peak_mib   max over samples of the whole GPU's memory.used minus the reading before the start
                      (a fallback that is only meaningful when nothing else runs on the GPU)
    method            "process", "device" (which of the two a reader should quote) or null (neither was
                      seen); also samples, seconds, rc, timed_out, command;
    series            [[unix time, process MiB | null, device MiB | null], ...] every sample, so a command
                      that runs several placements in turn (hotexperts bench records each one's window) gets
                      a peak per placement (compare.py ours-run).
Exit status: CMD's (124 when it ran past --timeout and was killed). No hotexperts imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

APPS = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
GPU = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]


def parse_apps(text: str) -> dict[int, int]:
    """'pid, MiB' lines -> {pid: MiB} (lines that do not parse, e.g. '[N/A]', are skipped)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = out.get(int(parts[0]), 0) + int(parts[1])
    return out


def parse_gpu(text: str) -> int | None:
    vals = [int(v) for v in text.split() if v.strip().isdigit()]
    return sum(vals) if vals else None


def descendants(root: int) -> set[int]:
    """root and every process below it (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def query(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run(cmd: list[str], interval: float, timeout: float | None, stdout) -> dict:
    base = parse_gpu(query(GPU))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=stdout, start_new_session=True)
    peak, dev_peak, samples, timed_out, series = None, None, 0, False, []
    while proc.poll() is None:
        tick = time.monotonic()
        if timeout is not None and tick - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            timed_out = True
            break
        pids = descendants(proc.pid)
        mine = [mib for pid, mib in parse_apps(query(APPS)).items() if pid in pids]
        if mine:
            peak = max(peak or 0, sum(mine))
        used = parse_gpu(query(GPU))
        if used is not None and base is not None:
            dev_peak = max(dev_peak or 0, used - base)
        series.append([round(time.time(), 2), sum(mine) if mine else None,
                       None if used is None or base is None else used - base])
        samples += 1
        time.sleep(max(0.0, interval - (time.monotonic() - tick)))
    rc = 124 if timed_out else proc.wait()
    method = "process" if peak is not None else ("device" if dev_peak is not None else None)
    return dict(peak_mib=peak, device_peak_mib=dev_peak, method=method,
                baseline_device_mib=base, samples=samples, seconds=round(time.monotonic() - t0, 1), rc=rc,
                timed_out=timed_out, interval_s=interval, command=shlex.join(cmd), series=series)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--stdout", default=None, help="file for CMD's stdout (default: ours)")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    with open(a.stdout, "w") if a.stdout else open(os.devnull, "w") as f:
        res = run(cmd, a.interval, a.timeout, f if a.stdout else None)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"peak: {res['peak_mib']} MiB (process), {res['device_peak_mib']} MiB (device), {res['samples']} "
          f"samples, {res['seconds']} s, rc {res['rc']}", file=sys.stderr, flush=True)
    return res["rc"]


if __name__ == "__main__":
    sys.exit(main())
