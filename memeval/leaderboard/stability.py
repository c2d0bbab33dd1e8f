"""Ranking stability across organisms of different seeds (``organism:tiny@0,1,2``): does a ranking hold when
the model organism is retrained from another seed?

For each task present in every summary, each seed's ranking orders the methods scored on all seeds by the
primary metric (its direction; ties keep name order). Reported per task:

- ``kendall_tau``: Kendall's τ-a between the rankings of each pair of seeds, and their mean: (concordant −
  discordant) / (n choose 2) over the common methods; 1 = the same order, −1 = reversed;
- ``adjacent_held``: of the pairs of methods adjacent in the first seed's ranking, how many keep their order
  on every seed (``adjacent_total`` pairs); a ranking that flips between seeds says so here.

``memeval leaderboard stability RESULTS_SEED0 RESULTS_SEED1 ... --out stability.json`` writes it; the site
shows it on each task page when a ``stability.json`` lies in a results directory it is built from.
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
    """Per task present in every summary, the rankings, pairwise τ, mean τ and adjacent pairs held."""
    tasks = set.intersection(*({e["task"] for e in s["results"]} for s in summaries))
    out = {}
    for task in sorted(tasks):
        scored = [{e["method"] for e in s["results"] if e["task"] == task and e["primary"]["value"] is not None}
                  for s in summaries]
        methods = set.intersection(*scored)
        ranks = [ranking(s, task, methods) for s in summaries]
        if len(methods) < 2:
            continue
        taus = {f"{labels[i]}~{labels[j]}": kendall_tau(ranks[i], ranks[j])
                for i, j in itertools.combinations(range(len(ranks)), 2)}
        adjacent = list(zip(ranks[0], ranks[0][1:]))
        held = sum(all(r.index(x) < r.index(y) for r in ranks) for x, y in adjacent)
        out[task] = {"seeds": labels, "rankings": ranks, "kendall_tau": taus,
                     "kendall_tau_mean": sum(taus.values()) / len(taus), "adjacent_held": held,
                     "adjacent_total": len(adjacent)}
    return out


def stability_command(dirs: list[Path], out: Path) -> int:
    """``memeval leaderboard stability``: one result directory per organism seed, in seed order."""
    if len(dirs) < 2:
        raise UsageError("leaderboard stability: expected two or more result directories (one per organism seed)")
    summaries = []
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise UsageError(f"{path}: no such file (a result directory written by `memeval --output`)")
        summaries.append(json.loads(path.read_text()))
    labels = [str(next(iter(s["tasks"].values()), {}).get("model", d)) for s, d in zip(summaries, dirs)]
    result = stability(summaries, labels)
    if not result:
        raise UsageError("leaderboard stability: no task was scored with two or more methods in every directory")
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for task, r in result.items():
        print(f"{task}: mean Kendall tau {r['kendall_tau_mean']:.3f} over {len(r['kendall_tau'])} seed pairs; "
              f"{r['adjacent_held']}/{r['adjacent_total']} adjacent pairs hold on every seed")
    return 0


def find_stability(results_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """Merged ``stability.json`` files found at the top of the given results directories."""
    out: dict[str, dict[str, Any]] = {}
    for d in results_dirs:
        path = Path(d) / "stability.json"
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out
