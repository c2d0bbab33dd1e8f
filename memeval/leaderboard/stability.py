"""Ranking stability across organisms of different seeds (``organism:tiny@0,1,2``): does a ranking hold when
the model organism is retrained from another seed?

The result sets given are grouped by the model each task was scored on (``organism:tiny``,
``organism:tiny@1``, ...; within one model the newer result of a (method, task) wins, as on the site). Only
results the site would rank count: no errored item, a value for the primary metric, and the task version
the newest of that task's groups has. For each task scored on two or more models, each model's ranking orders
the methods scored on all of them by the primary metric (its direction; ties keep name order). Reported per
task:

- ``kendall_tau``: Kendall's τ-a between the rankings of each pair of seeds, and their mean: (concordant −
  discordant) / (n choose 2) over the common methods; 1 = the same order, −1 = reversed;
- ``adjacent_held``: of the pairs of methods adjacent in the first seed's ranking, how many keep their order
  on every seed (``adjacent_total`` pairs); a ranking that flips between seeds says so here;
- ``sources``: per seed, the result sets its results came from.

``memeval leaderboard stability DIR... --out stability.json`` writes it (DIR: result sets or directories
holding them); the site shows it on each task page when a ``stability.json`` lies in a results directory it
is built from.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from memeval.errors import UsageError


def ranking(summary: dict[str, Any], task: str, methods: set[str]) -> list[str]:
    """Methods of ``methods`` scored on ``task``, best first by the primary metric."""
    entries = [e for e in summary["results"] if e["task"] == task and e["method"] in methods
               and e["primary"]["value"] is not None]
    hib = entries[0]["primary"]["higher_is_better"] if entries else True
    return [e["method"] for e in sorted(entries, key=lambda e: (-e["primary"]["value"] if hib else e["primary"]["value"],
                                                                 e["method"]))]


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall's τ-a of two orderings of the same items."""
    pos = {m: i for i, m in enumerate(b)}
    pairs = list(itertools.combinations(a, 2))
    if not pairs:
        return 1.0
    agree = sum(1 if pos[x] < pos[y] else -1 for x, y in pairs)  # x is before y in a
    return agree / len(pairs)


def stability(summaries: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per task present in two or more summaries: the rankings, pairwise τ, mean τ and adjacent pairs held."""
    out = {}
    for task in sorted({e["task"] for s in summaries for e in s["results"]}):
        having = [i for i, s in enumerate(summaries) if any(e["task"] == task for e in s["results"])]
        subs, labs = [summaries[i] for i in having], [labels[i] for i in having]
        scored = [{e["method"] for e in s["results"] if e["task"] == task and e["primary"]["value"] is not None}
                  for s in subs]
        methods = set.intersection(*scored)
        if len(subs) < 2 or len(methods) < 2:
            continue
        ranks = [ranking(s, task, methods) for s in subs]
        taus = {f"{labs[i]}~{labs[j]}": kendall_tau(ranks[i], ranks[j])
                for i, j in itertools.combinations(range(len(ranks)), 2)}
        adjacent = list(zip(ranks[0], ranks[0][1:]))
        held = sum(all(r.index(x) < r.index(y) for r in ranks) for x, y in adjacent)
        out[task] = {"seeds": labs, "rankings": ranks, "kendall_tau": taus,
                     "kendall_tau_mean": sum(taus.values()) / len(taus), "adjacent_held": held,
                     "adjacent_total": len(adjacent)}
        if all("sources" in s for s in subs):
            out[task]["sources"] = [s["sources"].get(task, []) for s in subs]
    return out


def seed_order(label: str) -> tuple[str, int]:
    """``organism:tiny`` (seed 0) before ``organism:tiny@1`` before ``organism:tiny@2``."""
    base, _, seed = label.partition("@")
    return base, int(seed) if seed.isdigit() else 0


def summaries_by_model(dirs: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The validated result sets under ``dirs`` as one summary per model, in seed order.

    Each summary holds, per (method, task) scored on that model, the newest ranked-eligible result (no errored
    item); a task's results whose version is older than the newest version among the models are left out.
    """
    from memeval.leaderboard.build import load_all

    sets = load_all(dirs)
    newest_version: dict[str, int] = {}
    for rs in sets:
        for task, meta in rs.tasks.items():
            newest_version[task] = max(newest_version.get(task, 0), meta["version"])
    chosen: dict[str, dict[tuple[str, str], tuple[Any, dict, str]]] = {}
    for rs in sets:
        for r in rs.results:
            meta = rs.tasks[r["task"]]
            if r["errors"] > 0 or meta["version"] != newest_version[r["task"]]:
                continue
            rows = chosen.setdefault(str(meta["model"]), {})
            key = (r["method"], r["task"])
            if key not in rows or rs.date >= rows[key][0]:
                rows[key] = (rs.date, r, rs.path.name)
    labels = sorted(chosen, key=seed_order)
    summaries = []
    for label in labels:
        rows = chosen[label].values()
        sources: dict[str, list[str]] = {}
        for _, r, name in rows:
            if name not in sources.setdefault(r["task"], []):
                sources[r["task"]].append(name)
        summaries.append({"results": [r for _, r, _ in rows], "sources": {t: sorted(s) for t, s in sources.items()}})
    return summaries, labels


def stability_command(dirs: list[Path], out: Path) -> int:
    """``memeval leaderboard stability``: result sets of organisms of different seeds (or directories of them)."""
    summaries, labels = summaries_by_model([Path(d) for d in dirs])
    result = stability(summaries, labels)
    if not result:
        raise UsageError("leaderboard stability: no task was scored with two or more methods on two or more models "
                         f"(models found: {', '.join(labels) or 'none'})")
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for task, r in result.items():
        print(f"{task}: mean Kendall tau {r['kendall_tau_mean']:.3f} over {len(r['kendall_tau'])} seed pairs "
              f"({', '.join(r['seeds'])}); {r['adjacent_held']}/{r['adjacent_total']} adjacent pairs hold on every seed")
    return 0


def find_stability(results_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """Merged ``stability.json`` files found at the top of the given results directories."""
    out: dict[str, dict[str, Any]] = {}
    for d in results_dirs:
        path = Path(d) / "stability.json"
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out
