"""Cache statistics per MoE layer: hits, misses, swaps, bytes moved, CPU and GPU time.

Counts are per routed selection (token, k): hits + misses == tokens * top_k of every executor call.
    stats.routed(layer, hits, misses)      stats.swap(layer, nbytes)
    stats.routed_rows(rows, hits, misses, cpu_s)   (vectorised, rows = positions in `layers`)
    stats.cpu_time(layer, s)               stats.gpu_events(layer, start, end)   (CUDA events, read lazily)
    stats.end_step()                       snapshots every `bucket` steps (for the heatmap)
    stats.to_dict() -> {"layers": {l: {...}}, "total": {...}}      (JSON / metrics)
    stats.table() -> str                   (`generate --stats`)
    stats.heatmap(path)                    per-layer hit rate over time, PNG (matplotlib Agg)
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

FIELDS = ("hits", "misses", "swaps", "bytes_moved", "cpu_s", "gpu_s")


class CacheStats:
    def __init__(self, layers: list[int], bucket: int = 16):
        self.layers = list(layers)
        self._row = {l: i for i, l in enumerate(self.layers)}
        self.c = {f: np.zeros(len(self.layers), dtype=np.float64) for f in FIELDS}    # [Lm] per field
        self.bucket, self.steps = bucket, 0
        self._snaps: list[np.ndarray] = []              # each [2, Lm] cumulative hits, misses
        self._events: dict[int, list] = defaultdict(list)

    def routed(self, layer: int, hits: int, misses: int) -> None:
        i = self._row[layer]
        self.c["hits"][i] += hits
        self.c["misses"][i] += misses

    def routed_rows(self, rows: np.ndarray, hits: np.ndarray, misses: np.ndarray, cpu_s=None) -> None:
        """Vectorised routed() (+ cpu_time()) for stats rows `rows` (positions in `layers`), one step."""
        np.add.at(self.c["hits"], rows, hits)
        np.add.at(self.c["misses"], rows, misses)
        if cpu_s is not None:
            np.add.at(self.c["cpu_s"], rows, cpu_s)

    def swap(self, layer: int, nbytes: int) -> None:
        i = self._row[layer]
        self.c["swaps"][i] += 1
        self.c["bytes_moved"][i] += nbytes

    def cpu_time(self, layer: int, seconds: float) -> None:
        self.c["cpu_s"][self._row[layer]] += seconds

    def gpu_events(self, layer: int, start, end) -> None:
        self._events[layer].append((start, end))

    def end_step(self) -> None:
        self.steps += 1
        if self._events and self.steps % self.bucket == 0:
            self._resolve_events(block=False)
        if self.steps % self.bucket == 0:
            self._snaps.append(np.stack([self.c["hits"], self.c["misses"]]).copy())

    def _resolve_events(self, block: bool = True) -> None:
        for layer, evs in self._events.items():
            left = []
            for start, end in evs:
                if not block and not end.query():
                    left.append((start, end))
                    continue
                end.synchronize()
                self.c["gpu_s"][self._row[layer]] += start.elapsed_time(end) / 1e3
            evs[:] = left

    def hit_rate(self) -> np.ndarray:
        """[Lm] hit rate per layer (NaN where nothing was routed)."""
        n = self.c["hits"] + self.c["misses"]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, self.c["hits"] / np.maximum(n, 1), np.nan)

    def to_dict(self) -> dict:
        self._resolve_events()
        rate = self.hit_rate()
        layers = {}
        for i, l in enumerate(self.layers):
            d = {f: self._num(f, self.c[f][i]) for f in FIELDS}
            d["hit_rate"] = None if np.isnan(rate[i]) else float(rate[i])
            layers[l] = d
        total = {f: self._num(f, self.c[f].sum()) for f in FIELDS}
        n = total["hits"] + total["misses"]
        total["hit_rate"] = total["hits"] / n if n else None
        total["steps"] = self.steps
        return {"layers": layers, "total": total}

    @staticmethod
    def _num(field: str, v: float):
        return float(v) if field.endswith("_s") else int(v)

    def table(self) -> str:
        d = self.to_dict()
        head = (f"{'layer':>5} {'hits':>9} {'misses':>9} {'hit%':>6} {'swaps':>7} {'MiB moved':>10} "
                f"{'cpu ms':>9} {'gpu ms':>9}")
        rows = [head] + [self._line(str(l), r) for l, r in d["layers"].items()]
        rows.append(self._line("all", d["total"]))
        return "\n".join(rows)

    @staticmethod
    def _line(name: str, r: dict) -> str:
        rate = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}"
        return (f"{name:>5} {r['hits']:>9} {r['misses']:>9} {rate:>6} {r['swaps']:>7} "
                f"{r['bytes_moved'] / 2**20:>10.1f} {1e3 * r['cpu_s']:>9.1f} {1e3 * r['gpu_s']:>9.1f}")

    def heatmap(self, path: str) -> str:
        """Per-layer hit rate per bucket of steps (the last partial bucket included) -> PNG at `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        now = np.stack([self.c["hits"], self.c["misses"]])
        snaps = [np.zeros((2, len(self.layers)))] + self._snaps + [now]
        cum = np.stack(snaps)                                        # [B+2, 2, Lm]
        d = np.diff(cum, axis=0)                                     # [B+1, 2, Lm]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = d[:, 0] / (d[:, 0] + d[:, 1])                     # [B+1, Lm]
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(self.layers) + 2))
        im = ax.imshow(rate.T, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_xlabel(f"steps (buckets of {self.bucket})")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        fig.colorbar(im, ax=ax, label="hit rate")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
