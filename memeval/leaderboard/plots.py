"""SVG plots for a task page, drawn with matplotlib (no pyplot: no global state, works headless).

Tolerant: each plot is drawn from whatever metrics exist in the rows and skipped when there is nothing.

- recall@k curves: metrics ``recall@<k>x`` (and ``global_recall@<k>x``, ``ceiling@<k>x``), INJ;
- per-ratio bars: metrics ``<name>@<ratio>`` with a numeric ratio, DEL;
- the forget-vs-collateral frontier: per method the staircase that the specificity headline integrates
  (:func:`memeval.metrics.forget_collateral_frontier`), from ``collateral@budget=<b>`` and ``forget_em_drop@budget=<b>``;
- forget-vs-collateral curves: metrics ``<name>@budget=<b>``, specificity; the x axis is the first metric whose
  name contains "forget", every metric not about the forget set is a collateral y axis (without a forget
  metric: metric vs budget);
- ROC curves: metrics ``tpr@fpr=<x>``, detection;
- predicted vs true M: metrics ``predicted_m@bin=<centre>``, prediction.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

_RECALL = re.compile(r"^(recall|global_recall|ceiling)@(\d+(?:\.\d+)?)x$")
_RATIO = re.compile(r"^(.+)@([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)$")
_BUDGET = re.compile(r"^(.+)@budget=([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)$")


def _val(row: dict, name: str) -> tuple[float | None, float | None]:
    m = row["metrics"].get(name)
    if not m:
        return None, None
    mean, se = m.get("mean"), m.get("stderr")
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return (mean if ok(mean) else None), (se if ok(se) else None)


# Up to 12 methods in one plot, each with its own colour and marker (tab10 plus two, and 12 markers).
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aec7e8")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


def style(i: int) -> dict[str, str]:
    """Colour and marker of the i-th method of a plot: distinct for the first 12."""
    return {"color": _COLORS[i % len(_COLORS)], "marker": _MARKERS[i % len(_MARKERS)]}


def _label(name: str, limit: int = 32) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _save(fig: Figure, path: Path) -> None:
    with matplotlib.rc_context({"svg.hashsalt": "memeval", "svg.fonttype": "path"}):
        fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")


def recall_curve(rows: list[dict], path: Path, order: list[str] = ()) -> bool:
    series: dict[str, dict[str, list[tuple[float, float, float | None]]]] = {}
    ceiling: dict[float, list[float]] = {}
    for r in rows:
        for name in r["metrics"]:
            m = _RECALL.match(name)
            if not m:
                continue
            mean, se = _val(r, name)
            if mean is None:
                continue
            k = float(m.group(2))
            if m.group(1) == "ceiling":
                ceiling.setdefault(k, []).append(mean)
            else:
                series.setdefault(r["method"], {}).setdefault(m.group(1), []).append((k, mean, se))
    if not series:
        return False
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ks: set[float] = set()
    for i, (method, kinds) in enumerate(series.items()):
        color, marker = style(i)["color"], style(i)["marker"]
        for kind, pts in kinds.items():
            pts.sort()
            ks.update(p[0] for p in pts)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts],
                        color=color, marker=marker, capsize=3, linestyle="-" if kind == "recall" else ":",
                        label=_label(method) + ("" if kind == "recall" else " (global)"))
    if ceiling:
        cx = sorted(ceiling)
        ax.plot(cx, [sum(ceiling[k]) / len(ceiling[k]) for k in cx], color="0.5", linestyle="--",
                marker="_", label="ceiling (per-layer top-k)")
    ax.set_xticks(sorted(ks))
    ax.set_xticklabels([f"{k:g}x" for k in sorted(ks)])
    ax.set_xlabel("k (multiple of the number of injected neurons)")
    ax.set_ylabel("recall")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)
    return True


def _ordered(bases, order: list[str]) -> list[str]:
    """Metric bases in the order their first metric appears in ``order`` (primary first), then by name."""
    pos = {}
    for i, name in enumerate(order):
        pos.setdefault(name.split("@", 1)[0], i)
    return sorted(bases, key=lambda b: (pos.get(b, len(order)), b))


def ratio_bars(rows: list[dict], path: Path, order: list[str] = ()) -> bool:
    data: dict[str, dict[str, dict[float, tuple[float, float | None]]]] = {}
    for r in rows:
        for name in r["metrics"]:
            if _BUDGET.match(name):
                continue
            m = _RATIO.match(name)
            if not m:
                continue
            mean, se = _val(r, name)
            if mean is not None:
                data.setdefault(m.group(1), {}).setdefault(r["method"], {})[float(m.group(2))] = (mean, se)
    if not data:
        return False
    bases = _ordered(data, list(order))[:6]
    ncols = min(3, len(bases))
    nrows = math.ceil(len(bases) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.6))
    methods = [r["method"] for r in rows if any(r["method"] in data[b] for b in bases)]
    for j, base in enumerate(bases):
        ax = fig.add_subplot(nrows, ncols, j + 1)
        ratios = sorted({x for per in data[base].values() for x in per})
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            per = data[base].get(method, {})
            xs = [ratios.index(x) + (i - (len(methods) - 1) / 2) * width for x in per]
            ax.bar(xs, [v[0] for v in per.values()], width, yerr=[v[1] or 0 for v in per.values()],
                   color=style(i)["color"], capsize=2, label=_label(method))
        ax.set_xticks(range(len(ratios)))
        ax.set_xticklabels([f"{x:g}" for x in ratios])
        ax.set_xlabel("ratio of neurons zeroed per layer")
        ax.set_title(_label(base, 40), fontsize=10)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.subplots_adjust(bottom=0.12 + 0.04 * math.ceil(len(labels) / 4) / nrows, hspace=0.5, wspace=0.35)
    _save(fig, path)
    return True


def _panels(bases: list[str]) -> tuple[str | None, list[str]]:
    """The x metric (the first about forgetting) and the y metrics of the budget curves: at most 6, none about
    the forget set (a forget-set metric against the forget-set drop is a quantity against itself)."""
    forget = next((b for b in bases if "forget" in b), None)
    return forget, [b for b in bases if "forget" not in b][:6] or ([forget] if forget else [])


def budget_curves(rows: list[dict], path: Path, order: list[str] = ()) -> bool:
    data: dict[str, dict[str, dict[float, float]]] = {}
    for r in rows:
        for name in r["metrics"]:
            m = _BUDGET.match(name)
            if not m:
                continue
            mean, _ = _val(r, name)
            if mean is not None:
                data.setdefault(m.group(1), {}).setdefault(r["method"], {})[float(m.group(2))] = mean
    if not data:
        return False
    bases = _ordered(data, list(order))
    forget, others = _panels(bases)
    vs_budget = forget is None or others == [forget]
    ncols = min(2, len(others))
    nrows = math.ceil(len(others) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows + 0.6))
    methods = [r["method"] for r in rows]
    for j, base in enumerate(others):
        ax = fig.add_subplot(nrows, ncols, j + 1)
        for i, method in enumerate(methods):
            ys = data[base].get(method, {})
            if vs_budget:
                bs = sorted(ys)
                xs = bs
            else:
                fx = data[forget].get(method, {})
                bs = sorted(b for b in ys if b in fx)
                xs = [fx[b] for b in bs]
            if not bs:
                continue
            ax.plot(xs, [ys[b] for b in bs], **style(i), label=_label(method))
        ax.set_xlabel("budget" if vs_budget else _label(forget, 40) + " (forgetting)")
        ax.set_ylabel(_label(base, 40))
        ax.set_title(("" if vs_budget else "collateral: ") + _label(base, 40), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.subplots_adjust(hspace=0.5, wspace=0.35)
    _save(fig, path)
    return True


def frontier(rows: list[dict], path: Path, order: list[str] = (), params: dict | None = None) -> bool:
    """Per method, the staircase f(x) = the most forgetting any tried budget reached with collateral ≤ x,
    from the mean ``collateral`` and ``forget_em_drop`` of each budget, on [0, max_ppl_increase]: the curve the
    headline ``forget_collateral_auc`` integrates (the headline is the mean of each item's own area)."""
    from memeval.metrics import forget_collateral_frontier

    bound = float((params or {}).get("max_ppl_increase", 0.5))
    curves = {}
    for r in rows:
        pts = []
        for name in r["metrics"]:
            m = _BUDGET.match(name)
            if m and m.group(1) == "collateral":
                x, _ = _val(r, name)
                y, _ = _val(r, f"forget_em_drop@budget={m.group(2)}")
                if x is not None and y is not None:
                    pts.append((x, y))
        if pts:
            curves[r["method"]] = (forget_collateral_frontier(pts, bound), pts)
    if not curves:
        return False
    fig = Figure(figsize=(6.0, 4.4))
    ax = fig.add_subplot()
    for i, (method, (segments, pts)) in enumerate(curves.items()):
        xs = [x for a, b, _ in segments for x in (a, b)]
        ys = [y for _, _, y in segments for _ in (0, 1)]
        ax.plot(xs, ys, color=style(i)["color"], linewidth=1.8, label=_label(method))
        inside = [(x, min(1.0, max(0.0, y))) for x, y in pts if x <= bound]
        if inside:
            ax.scatter([max(0.0, x) for x, _ in inside], [y for _, y in inside], color=style(i)["color"],
                       marker=style(i)["marker"], s=22, zorder=3)
    ax.set_xlim(0, bound)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("collateral (max of held-out perplexity increase, other memorized and probe loss)")
    ax.set_ylabel("forget-set exact match removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return True


def _series(rows: list[dict], pattern: re.Pattern) -> dict[str, list[tuple[float, float, float | None]]]:
    """Per method, (x, mean, stderr) of every metric matching ``pattern`` (x = its first group), sorted by x."""
    series: dict[str, list[tuple[float, float, float | None]]] = {}
    for r in rows:
        for name in r["metrics"]:
            m = pattern.match(name)
            mean, se = _val(r, name) if m else (None, None)
            if m and mean is not None:
                series.setdefault(r["method"], []).append((float(m.group(1)), mean, se))
    return {k: sorted(v) for k, v in series.items()}


_ROC = re.compile(r"^tpr@fpr=([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)$")


def roc_curves(rows: list[dict], path: Path, order: list[str] = ()) -> bool:
    """ROC curves from the metrics ``tpr@fpr=<x>`` (detection): per method the mean TPR over items at each
    FPR of the grid (vertical averaging) ± stderr, from (0, 0) to (1, 1), and the chance diagonal."""
    series = {k: v for k, v in _series(rows, _ROC).items() if len(v) >= 2}
    if not series:
        return False
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    diag = [i / 1000 for i in range(1001)]  # dense: y = x is curved on the symlog axis
    ax.plot(diag, diag, color="0.6", linestyle=":", label="chance")
    for i, (method, pts) in enumerate(series.items()):
        xs, ys = [0.0] + [p[0] for p in pts] + [1.0], [0.0] + [p[1] for p in pts] + [1.0]
        se = [0.0] + [p[2] or 0.0 for p in pts] + [0.0]
        color = style(i)["color"]
        ax.plot(xs, ys, **style(i), markersize=3, label=_label(method))
        ax.fill_between(xs, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)], color=color, alpha=0.15)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive rate (symlog)")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return True


_BIN = re.compile(r"^predicted_m@bin=([0-9]*\.?[0-9]+)$")


def predicted_vs_true(rows: list[dict], path: Path, order: list[str] = ()) -> bool:
    """Per method, the mean predicted memorization score M of the test sequences in each bin of true M
    (metrics ``predicted_m@bin=<bin centre>``), against the diagonal of a calibrated predictor."""
    series = _series(rows, _BIN)
    if not series:
        return False
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="calibrated")
    for i, (method, pts) in enumerate(series.items()):
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], capsize=3,
                    **style(i), label=_label(method))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true M (bin centre)")
    ax.set_ylabel("mean predicted M")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)
    return True


PLOTS = (
    ("frontier", frontier, "forget-vs-collateral frontier",
     "The staircase each method's headline integrates: at each collateral x, the most forgetting of any tried "
     "budget with collateral at most x (means over items per budget; markers: the budgets)."),
    ("recall", recall_curve, "recall@k curves",
     "Per-layer recall@k (solid) and global recall@k (dotted) of the injected neurons, mean ± stderr; dashed: the per-layer top-k ceiling."),
    ("ratios", ratio_bars, "per-ratio effects",
     "Mean change of each metric after zeroing the top-ranked neurons, by ratio of neurons per layer (± stderr)."),
    ("budget", budget_curves, "forget-vs-collateral curves",
     "Each point is one budget of the sweep: forgetting achieved (x) against the collateral damage (y)."),
    ("calibration", predicted_vs_true, "predicted vs true memorization score",
     "Mean predicted M (mean token probability) of the test sequences in each bin of true M, ± stderr over "
     "splits; dotted: a calibrated predictor."),
    ("roc", roc_curves, "ROC curves",
     "True-positive rate of the memorized samples at fixed false-positive rates, mean over targets ± stderr (shaded)."),
)


def task_plots(rows: list[dict[str, Any]], out_dir: Path, stem: str, order: list[str] = (),
               params: dict | None = None) -> list[dict[str, str]]:
    """Write every plot that the rows support as ``out_dir/<stem>-<kind>.svg``; return their descriptions.
    ``params`` are the task's params when the summary carries them (the frontier's collateral bound)."""
    made = []
    for kind, fn, title, caption in PLOTS:
        path = out_dir / f"{stem}-{kind}.svg"
        if (fn(rows, path, order, params) if fn is frontier else fn(rows, path, order)):
            made.append({"file": path.name, "title": title, "caption": caption})
    return made
