"""Ranking stability over organism seeds: Kendall's tau and held adjacent pairs by hand, result sets grouped by
the model each task ran on, and the task page that shows it."""

from __future__ import annotations

import copy
import json

import pytest

from memeval.errors import UsageError
from memeval.leaderboard import build_site
from test_leaderboard import mf  # the generator of the fixture result sets


@pytest.fixture
def sets(tmp_path):
    root = tmp_path / "results"
    mf.main(root)
    return root


def test_ranking_stability_by_hand(tmp_path):
    from memeval.leaderboard.stability import kendall_tau, stability

    assert kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    assert kendall_tau(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)  # 2 concordant, 1 discordant

    def summary(values: dict[str, float], model: str) -> dict:
        return {"tasks": {"t": {"model": model}},
                "results": [{"method": m, "task": "t", "primary": {"value": v, "higher_is_better": False}}
                            for m, v in values.items()]}

    # lower is better: seed 0 ranks a > b > c; seed 1 swaps b and c; "d" is missing on seed 1 and left out
    s0, s1 = summary({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.0}, "organism:tiny"), summary({"a": 0.1, "b": 0.4, "c": 0.3}, "organism:tiny@1")
    r = stability([s0, s1], ["organism:tiny", "organism:tiny@1"])["t"]
    assert r["rankings"] == [["a", "b", "c"], ["a", "c", "b"]]
    assert r["kendall_tau_mean"] == pytest.approx(1 / 3) and (r["adjacent_held"], r["adjacent_total"]) == (1, 2)


def test_ranking_stability_groups_result_sets_by_model(tmp_path, sets):
    """Sets are grouped by the model a task ran on; within a model the newer result wins; errored results and
    older task versions are left out; a task on one model only is not reported."""
    from memeval.leaderboard.stability import stability_command

    tasks1 = copy.deepcopy(mf.TASKS)
    for t in tasks1.values():
        t["model"] = "organism:tiny@1"
    tasks1["spec_organism"]["version"] = 0  # an older version of the task: left out
    seed1 = [  # inj: activations overtakes hard_concrete; del: hard_concrete is ranked here, errored on seed 0
        mf.result("slimming", "inj_organism", mf.inj_means(0.60), 12, seed=1),
        mf.result("hard_concrete", "inj_organism", mf.inj_means(0.20), 12, seed=1),
        mf.result("activations", "inj_organism", mf.inj_means(0.35), 12, seed=1),
        mf.result("random", "inj_organism", mf.inj_means(0.02), 12, seed=1),
        mf.result("slimming", "del_organism", mf.del_means(0.50), 10, seed=1),
        mf.result("activations", "del_organism", mf.del_means(0.20), 10, seed=1),
        mf.result("random", "del_organism", mf.del_means(0.01), 10, seed=1),
        mf.result("hard_concrete", "del_organism", mf.del_means(0.90), 10, seed=1),
        mf.result("kfac_curvature", "spec_organism", mf.spec_means(0.1), 6, seed=1),
        mf.result("balanced_subnet", "spec_organism", mf.spec_means(0.3), 6, seed=1),
    ]
    mf.write_set(tmp_path / "seeds" / "seed1", mf.meta("2026-11-24T00:00:00+00:00", "b" * 40), seed1, tasks=tasks1)
    out = tmp_path / "stability.json"
    assert stability_command([tmp_path / "seeds", sets], out) == 0
    st = json.loads(out.read_text())
    assert sorted(st) == ["del_organism", "inj_organism"]  # spec_organism: the newest version on one model only
    inj = st["inj_organism"]
    assert inj["seeds"] == ["organism:tiny", "organism:tiny@1"]  # seed order, whatever the order of the arguments
    assert inj["rankings"] == [["slimming", "hard_concrete", "activations", "random"],
                               ["slimming", "activations", "hard_concrete", "random"]]
    assert inj["kendall_tau_mean"] == pytest.approx(4 / 6) and (inj["adjacent_held"], inj["adjacent_total"]) == (2, 3)
    # del_organism on seed 0: slimming from set_b (newer than set_a's), hard_concrete errored there: left out
    assert st["del_organism"]["rankings"][0] == ["slimming", "activations", "random"]
    assert st["del_organism"]["sources"] == [["set_a", "set_b"], ["seed1"]]
    with pytest.raises(UsageError, match=r"\(models found: organism:tiny\)$"):
        stability_command([sets], tmp_path / "none.json")


def test_task_page_shows_ranking_stability_and_says_when_it_flips(tmp_path, sets):
    st = {"inj_organism": {"seeds": ["organism:tiny", "organism:tiny@1"], "rankings": [["a", "b"], ["b", "a"]],
                           "kendall_tau": {"organism:tiny~organism:tiny@1": -1.0}, "kendall_tau_mean": -1.0,
                           "adjacent_held": 0, "adjacent_total": 1}}
    (sets / "stability.json").write_text(json.dumps(st))
    build_site([sets], tmp_path / "site")
    page = (tmp_path / "site" / "tasks" / "inj_organism.html").read_text()
    assert "Ranking stability over organism seeds" in page and "mean Kendall τ\n-1.000" in page
    assert "the ranking flips between seeds" in page
    assert "Ranking stability" not in (tmp_path / "site" / "tasks" / "del_organism.html").read_text()
