"""The dose-response plot of an organism: exact-match rate against duplication count."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_dose_response(planted: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """PNG of the exact-match and memorized (DEL filters) rates per duplication count, log2 x axis,
    with one thin line per kind."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dups = sorted({p["duplicates"] for p in planted})

    def rate(rows, flag):
        return [sum(bool(r[flag]) for r in rows if r["duplicates"] == d) /
                max(1, sum(1 for r in rows if r["duplicates"] == d)) for d in dups]

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for kind in sorted({p["kind"] for p in planted}):
        rows = [p for p in planted if p["kind"] == kind]
        ax.plot(dups, rate(rows, "exact"), lw=0.8, alpha=0.6, marker=".", label=f"exact: {kind}")
    ax.plot(dups, rate(planted, "exact"), lw=2.5, color="black", marker="o", label="exact match (all)")
    ax.plot(dups, rate(planted, "memorized"), lw=2, ls="--", color="tab:red", marker="s",
            label="memorized (DEL filters)")
    acc = [sum(r["suffix_acc"] for r in planted if r["duplicates"] == d) /
           max(1, sum(1 for r in planted if r["duplicates"] == d)) for d in dups]
    ax.plot(dups, acc, lw=1.5, ls=":", color="tab:blue", marker="^", label="mean suffix accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dups)
    ax.set_xticklabels([str(d) for d in dups])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("duplication count in the training corpus")
    ax.set_ylabel("rate")
    ax.set_title(title or "memorization vs duplication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
