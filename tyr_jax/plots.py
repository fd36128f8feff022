"""Pictures of a pruning run, saved as PNG: per-layer kept fractions and the search's fitness."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_layers(per_layer: list[dict], num_kv_heads: int, intermediate_size: int, path: pathlib.Path,
                title: str) -> None:
    """Bars of the fraction of KV groups and MLP channels each layer keeps."""
    layers = np.arange(len(per_layer))
    attn = [r["kv_groups_kept"] / num_kv_heads for r in per_layer]
    mlp = [r["mlp_channels_kept"] / intermediate_size for r in per_layer]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 3.5))
    ax.bar(layers - 0.2, attn, width=0.4, label="attention (KV groups)")
    ax.bar(layers + 0.2, mlp, width=0.4, label="MLP (channels)")
    ax.set(xlabel="layer", ylabel="fraction kept", ylim=(0, 1.25), title=title)
    ax.legend(loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fitness(history: list[list[float]], path: pathlib.Path) -> None:
    """The parent's top-k KL per generation, one line per coarse-to-fine iteration."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    start = 0
    for t, hist in enumerate(history):
        ax.plot(np.arange(start, start + len(hist)) + 1, hist, marker=".", label=f"iteration {t + 1}")
        start += len(hist)
    ax.set(xlabel="generation", ylabel="KL to dense (top-k)", title="search fitness (lower is better)")
    if history:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(rows: list[dict], keys: list[str], path: pathlib.Path, title: str, metric: str = "ppl") -> None:
    """`metric` of every ablation variant against the first varied key, one line per setting of the others."""
    x_values = [r[keys[0]] for r in rows]
    labels = list(dict.fromkeys(map(str, x_values)))   # values may be lists (unhashable)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in x_values)
    series: dict = {}
    for r, x in zip(rows, x_values):
        label = ", ".join(f"{k}={r[k]}" for k in keys[1:])
        series.setdefault(label, []).append((x if numeric else labels.index(str(x)), r[metric]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label or None)
    values = [r[metric] for r in rows if np.isfinite(r[metric]) and r[metric] > 0]
    if values and max(values) > 20 * min(values):
        ax.set_yscale("log")
    if numeric and min(x_values) > 0 and max(x_values) >= 10 * min(x_values):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel=keys[0], ylabel=metric, title=title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: pathlib.Path) -> None:
    """Held-out and out-of-domain perplexity against the fraction removed, one line per method (and
    variant); several seeds of a point as mean ± std; the dense model as a dotted line."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric, title in zip(axes, ("ppl", "ppl_ood"), ("held-out Wikipedia", "out of domain (news)")):
        series: dict = {}
        for r in rows:
            if r[metric] == "":
                continue
            variant = "" if r["variant"].startswith("search.seed=") else r["variant"]
            label = r["name"] + (f" ({variant})" if variant else "")
            series.setdefault(label, {}).setdefault(float(r["target"]), []).append(float(r[metric]))
        for label, points in series.items():
            xs = sorted(points)
            if xs == [0.0]:
                ax.axhline(points[0.0][0], color="grey", linestyle=":", label=label)
                continue
            ys = [np.mean(points[x]) for x in xs]
            errs = [np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs]
            ax.errorbar([100 * x for x in xs], ys, yerr=errs, marker="o", capsize=3, label=label)
        ax.set(yscale="log", xlabel="parameters removed (%)", ylabel="perplexity", title=title)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
