"""Simulator plots (matplotlib, Agg backend; imported only when --plot is given).

    hit_rate_curves(results, path)          decode hit rate against capacity, one line per policy
    layer_heatmap(results, layers, path)    per-layer decode hit rate, rows = policy @ capacity
    write_all(results, layers, folder) -> list[Path]
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _capacity(r) -> int:
    return r.slots if r.slots is not None else r.budget


def hit_rate_curves(results, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r.policy for r in results):
        rows = sorted((r for r in results if r.policy == name), key=_capacity)
        ax.plot([_capacity(r) for r in rows], [100 * r.hit_rate for r in rows], marker="o", label=name)
    per_layer = all(r.slots is not None for r in results)
    ax.set_xlabel("slots per layer" if per_layer else "global slot budget")
    ax.set_ylabel("decode hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def layer_heatmap(results, layers, path: str | Path) -> Path:
    data = np.array([r.layer_hit_rate for r in results]) * 100          # [rows, Lm]
    labels = [f"{r.policy} @ {_capacity(r)}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(layers) + 3), 0.3 * len(results) + 1.5))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    step = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers][::step], fontsize=7)
    ax.set_xlabel("MoE layer")
    fig.colorbar(im, ax=ax, label="decode hit rate (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_all(results, layers, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [hit_rate_curves(results, folder / "hit_rate.png"),
            layer_heatmap(results, layers, folder / "layer_heatmap.png")]
