"""The leaderboard: validation of result sets, rendering, escaping, and the site in headless Chromium."""

from __future__ import annotations

import copy
import filecmp
import importlib.util
import json
import re
from pathlib import Path

import pytest

from memeval.errors import UsageError
from memeval.leaderboard import build_site, load_result_set

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "results"
ARTIFACTS = REPO / "test-artifacts"
XSS = "<script>alert(1)</script>"

_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

# Expected rank order on the overview (see make_fixtures.py).
EXPECTED = {
    "inj_organism": ["slimming", "hard_concrete", "activations", "random"],
    "del_organism": ["slimming", "activations", "random"],
    "spec_organism": ["kfac_curvature", "balanced_subnet"],
}


@pytest.fixture
def sets(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    mf.main(root)
    return root


def edit_summary(set_dir: Path, fn) -> Path:
    path = set_dir / "summary.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=2))
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".memeval-site"))


def ranking_order(html: str) -> dict[str, list[str]]:
    out = {}
    for m in re.finditer(r'<table class="sortable ranking" data-task="([^"]+)">(.*?)</table>', html, re.S):
        body = m.group(2).split("<tbody>", 1)[1]
        out[m.group(1)] = re.findall(r'<tr data-method="([^"]+)">', body)
    return out


# ---------------------------------------------------------------------------------------------- build


def test_task_page_shows_the_paired_difference_to_the_rank_above(tmp_path):
    # Three items; per-item recall@1x: slimming 0.6, 0.5, 0.7; activations 0.4, 0.45, 0.5; random 0.1, 0.05, 0.3.
    # activations - slimming = -0.2, -0.05, -0.2: mean -0.15, sample sd sqrt(0.0075), stderr 0.05 (3 s.e.: *);
    # random - activations = -0.3, -0.4, -0.2: mean -0.3, sd 0.1, stderr 0.0577 (5.2 s.e.: *).
    values = {"slimming": [0.6, 0.5, 0.7], "activations": [0.4, 0.45, 0.5], "random": [0.1, 0.05, 0.3]}
    entries = []
    for method, vs in values.items():
        entry, recs = mf.result(method, "inj_organism", {"recall@1x": 0.0}, 3)
        for rec, v in zip(recs, vs):
            rec["metrics"]["recall@1x"] = v
        entry["primary"]["value"] = entry["metrics"]["recall@1x"]["mean"] = sum(vs) / 3
        entries.append((entry, recs))
    tasks = {"inj_organism": dict(mf.TASKS["inj_organism"], n_items=3)}
    mf.write_set(tmp_path / "results" / "paired", mf.meta("2026-11-23T12:00:00+00:00", "ab" * 20), entries, tasks=tasks)
    build_site([tmp_path / "results"], tmp_path / "site", contributing=None)
    html = (tmp_path / "site" / "tasks" / "inj_organism.html").read_text()
    cells = {m.group(1): re.sub(r"<[^>]+>", "", m.group(2)).strip() for m in re.finditer(
        r'<tr data-method="([^"]+)".*?<td class="num paired"[^>]*>(.*?)</td>', html, re.S)}
    assert cells == {"slimming": "—", "activations": "-0.15 ± 0.05 *", "random": "-0.3 ± 0.058 *"}
    assert 'title="activations − slimming over 3 shared items"' in html


def test_committed_fixtures_match_generator(tmp_path):
    mf.main(tmp_path)
    for name in ("set_a", "set_b"):
        for f in ("summary.json", "results.jsonl"):
            assert filecmp.cmp(tmp_path / name / f, FIXTURES / name / f, shallow=False), \
                f"tests/fixtures/results/{name}/{f} is stale: run python tests/fixtures/results/make_fixtures.py"


def test_build_fixture_site(tmp_path):
    out = tmp_path / "site"
    stats = build_site([FIXTURES], out, contributing=None)
    assert stats["pages"] == 12  # overview, result sets, submit, 3 tasks, 6 methods
    assert (stats["sets"], stats["methods"], stats["tasks"], stats["plots"]) == (2, 6, 3, 3)
    assert (stats["ranked"], stats["unranked"], stats["superseded"]) == (9, 1, 1)
    assert len(list(out.rglob("*.html"))) == stats["pages"]
    index = (out / "index.html").read_text()
    assert ranking_order(index) == EXPECTED
    # newer set wins and the page says so; errored pair is listed, not ranked
    assert "slimming on del_organism: kept the result of 02-set_b" in index
    assert "hard_concrete" in index and "not ranked: 2 errored items" in index
    # raw files are copied next to the pages and linked
    for sid in ("01-set_a", "02-set_b"):
        for f in ("summary.json", "results.jsonl"):
            assert (out / "data" / sid / f).read_bytes() == (FIXTURES / sid[3:] / f).read_bytes()
    assert 'href="data/02-set_b/summary.json"' in index
    # provenance beside numbers
    assert "memeval 0.1.0 · <code>a9b8c7d</code> · cpu/float32 · 2026-11-23" in index
    task = (out / "tasks" / "inj_organism.html").read_text()
    assert "organism:tiny" in task and "Task version" in task and 'src="../plots/inj_organism-recall.svg"' in task
    for svg in ("inj_organism-recall", "del_organism-ratios", "spec_organism-budget"):
        assert (out / "plots" / f"{svg}.svg").read_text().lstrip().startswith("<?xml")
    method = (out / "methods" / "slimming.html").read_text()
    assert "lambda_l1" in method and "50000" in method and "https://arxiv.org/abs/2311.09060" in method
    assert "placeholder" not in (out / "submit.html").read_text().lower()
    assert leftovers(tmp_path) == []


def test_rebuild_replaces_own_site_but_not_foreign_directory(tmp_path, sets):
    out = sets / "site"  # inside the results directory: its data/ copies must not be read back as sets
    first = build_site([sets], out)
    (out / "stale.html").write_text("old")
    second = build_site([sets], out)
    assert first == second and second["sets"] == 2
    assert not (out / "stale.html").exists() and (out / "index.html").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match=r"mine: --out: expected a new or empty directory"):
        build_site([sets], foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert leftovers(tmp_path) == [] and leftovers(sets) == []


def test_submit_page_from_contributing(tmp_path, sets):
    md = tmp_path / "CONTRIBUTING.md"
    md.write_text("# Adding a method\n\nWrite a **plugin**, see [the API](docs/api.md) and "
                  "[pluggy](https://pluggy.readthedocs.io/).\n\n<script>alert(1)</script>\n\n```\nmemeval --methods x\n```\n")
    build_site([sets], tmp_path / "site", contributing=md)
    html = (tmp_path / "site" / "submit.html").read_text()
    assert "<h1>Adding a method</h1>" in html and "<strong>plugin</strong>" in html
    assert '<a href="https://pluggy.readthedocs.io/">pluggy</a>' in html
    assert 'href="docs/api.md"' not in html and "the API" in html  # relative links would break offline
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# ---------------------------------------------------------------------------------------------- validation


def _limited(d):
    d["meta"]["limited"] = True
    d["meta"]["limit"] = 2


def _no_commit(d):
    del d["meta"]["git_commit"]


def _n_mismatch(d):
    d["results"][0]["n"] = 11


def _wrong_type(d):
    d["results"][1]["seconds_per_item"] = "fast"


def _bad_date(d):
    d["meta"]["date"] = "yesterday"


def _unknown_commit(d):
    d["meta"]["git_commit"] = "unknown"


def _primary_name(d):
    d["results"][2]["primary"]["name"] = "recall@2x"


def _unknown_method(d):
    d["results"][3]["method"] = "nope"


def _duplicate_pair(d):
    d["results"].append(copy.deepcopy(d["results"][0]))


def _mean_type(d):
    d["results"][0]["metrics"]["recall@1x"]["mean"] = [0.5]


@pytest.mark.parametrize("mutate, field, expected", [
    (_limited, "meta.limited", "expected false: runs made with --limit are never published or ranked"),
    (_no_commit, "meta.git_commit", "required provenance field is missing (expected a non-empty string)"),
    (_n_mismatch, "results[0].n", "expected 11 to equal the 12 metric records in results.jsonl for method "
                                  '"slimming", task "inj_organism", config_hash '),
    (_wrong_type, "results[1].seconds_per_item", 'expected a number or null, got a string "fast"'),
    (_bad_date, "meta.date", "expected an ISO 8601 date such as 2026-11-23T18:00:00+00:00, got \"yesterday\""),
    (_unknown_commit, "meta.git_commit", 'expected a git commit hash (7-40 hex digits), got "unknown"'),
    (_primary_name, "results[2].primary.name", 'expected the task\'s primary metric "recall@1x", got "recall@2x"'),
    (_unknown_method, "results[3].method", 'expected a method described in "methods", got "nope"'),
    (_duplicate_pair, "results[8]", "expected one result per (method, task); results[0] has the same pair"),
    (_mean_type, 'results[0].metrics.recall@1x.mean', "expected a number or null, got a list"),
])
def test_invalid_summary_is_rejected_with_one_line_and_nothing_written(tmp_path, sets, mutate, field, expected):
    path = edit_summary(sets / "set_a", mutate)
    out = tmp_path / "site"
    with pytest.raises(UsageError) as e:
        build_site([sets], out)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: {expected}"), msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_invalid_result_set_does_not_touch_existing_site(tmp_path, sets):
    out = tmp_path / "site"
    build_site([sets], out)
    before = (out / "index.html").read_text()
    edit_summary(sets / "set_b", _limited)
    with pytest.raises(UsageError, match=r"set_b/summary.json: meta.limited: "):
        build_site([sets], out)
    assert (out / "index.html").read_text() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("line, field, expected", [
    ("{not json", "line 50", "expected one JSON object per line"),
    ('{"method": "random", "task": "inj_organism", "item": 1, "config_hash": "x"}', "line 50",
     'expected a "metrics" object or an "error" string'),
    ('{"method": "random", "task": "inj_organism", "item": 1, "config_hash": "x", "metrics": {"a": "b"}}',
     "line 50.metrics.a", "expected a number or null, got a string"),
    ('[1, 2]', "line 50", "expected an object, got a list"),
])
def test_invalid_records_are_rejected(tmp_path, sets, line, field, expected):
    path = sets / "set_a" / "results.jsonl"
    lines = path.read_text().splitlines()
    lines[49] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError) as e:
        build_site([sets], tmp_path / "site")
    assert str(e.value).startswith(f"{path}: {field}: {expected}"), str(e.value)
    assert not (tmp_path / "site").exists()


def test_missing_files_and_empty_directories(tmp_path, sets):
    (sets / "set_b" / "results.jsonl").unlink()
    with pytest.raises(UsageError, match=r"set_b/results.jsonl: file: missing"):
        build_site([sets], tmp_path / "site")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"empty: summary.json: expected a result set here or in a subdirectory"):
        build_site([empty], tmp_path / "site")


def test_incomplete_run_and_stale_records(tmp_path, sets):
    # records of another config hash (a resumed run with another configuration) are ignored
    with (sets / "set_a" / "results.jsonl").open("a") as fh:
        fh.write(json.dumps({"method": "random", "task": "inj_organism", "item": 0, "config_hash": "old",
                             "seconds": 0.1, "metrics": {"recall@1x": 0.9}}) + "\n")
    assert load_result_set(sets / "set_a").results[3]["n"] == 12

    def incomplete(d):
        d["tasks"]["inj_organism"]["n_items"] = 13
    path = edit_summary(sets / "set_a", incomplete)
    with pytest.raises(UsageError, match=re.escape(f"{path}: results[0].n: expected n + errors = 13")):
        load_result_set(sets / "set_a")


def test_task_version_change_unranks_old_results(tmp_path, sets):
    def bump(d):
        d["tasks"]["del_organism"]["version"] = 2
    edit_summary(sets / "set_b", bump)
    build_site([sets], tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert ranking_order(index)["del_organism"] == ["slimming"]
    assert "not ranked: task version 1 (current: 2)" in index


# ---------------------------------------------------------------------------------------------- escaping


def xss_set(root: Path) -> Path:
    methods = {XSS: {"kind": XSS, "summary": XSS, "paper": "javascript:alert(1)", "plugin": XSS},
               "random": dict(mf.METHODS["random"])}
    task = dict(mf.TASKS["inj_organism"], description=XSS, model=XSS, tags=[XSS], version=XSS, n_items=3)
    task["higher_is_better"] = dict(task["higher_is_better"], **{XSS: True})
    tasks = {XSS: task}
    meta = mf.meta("2026-11-24T00:00:00+00:00", "0123456789abcdef0123456789abcdef01234567")
    meta.update(device=XSS, dtype=XSS, memeval_version=XSS, hardware=XSS, command=XSS)
    entries = []
    for name, q in ((XSS, 0.9), ("random", 0.1)):
        means = dict(mf.inj_means(q), **{XSS: q})
        e, recs = mf.result(name if name != XSS else "random", "inj_organism", means, 3,
                            config={XSS: XSS, "nested": {XSS: [XSS]}})
        e.update(method=name, task=XSS, kind=XSS if name == XSS else "localizer")
        for r in recs:
            r.update(method=name, task=XSS)
        entries.append((e, recs))
    return mf.write_set(root / XSS.replace("/", "_"), meta, entries, methods=methods, tasks=tasks)


def test_script_strings_render_as_text(tmp_path):
    build_site([xss_set(tmp_path / "results")], tmp_path / "site")
    site = tmp_path / "site"
    pages = list(site.rglob("*.html"))
    assert len(pages) == 3 + 1 + 2
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for page in pages:
        html = page.read_text()
        assert "<script>alert" not in html and "javascript:" not in html.replace("javascript:alert(1)</dd>", ""), page
        assert len(re.findall(r"<script\b", html)) == 1, page  # only sort.js
    index = (site / "index.html").read_text()
    assert ranking_order(index)[escaped] == [escaped, "random"]
    method_page = next(p for p in (site / "methods").iterdir() if p.name != "random.html")
    html = method_page.read_text()
    assert f"<h1>{escaped}</h1>" in html
    assert '<a href="javascript' not in html and "javascript:alert(1)" in html  # paper shown as text only
    for svg in (site / "plots").iterdir():
        assert "<script" not in svg.read_text()


def test_specificity_page_plots_the_frontier_first_in_distinct_styles(tmp_path):
    from memeval.leaderboard.plots import _panels, style, task_plots
    from memeval.metrics import forget_collateral_auc, forget_collateral_frontier

    pairs = {(style(i)["color"], style(i)["marker"]) for i in range(12)}
    assert len(pairs) == 12 and len({c for c, _ in pairs}) == 12  # npo and random no longer share a blue
    # the staircase drawn is the one the headline integrates (the README's example)
    assert forget_collateral_frontier([(0.1, 0.5), (0.3, 1.0)], 1.0) == [(0.0, 0.1, 0.0), (0.1, 0.3, 0.5), (0.3, 1.0, 1.0)]
    assert sum((b - a) * y for a, b, y in forget_collateral_frontier([(0.1, 0.5), (0.3, 1.0)], 1.0)) == \
        pytest.approx(forget_collateral_auc([(0.1, 0.5), (0.3, 1.0)], 1.0))
    # no panel plots a forget-set quantity against the forget-set drop
    forget, panels = _panels(["forget_em_drop", "forget_em", "forget_loose", "collateral", "other_em", "heldout_ppl"])
    assert forget == "forget_em_drop" and panels == ["collateral", "other_em", "heldout_ppl"]
    metric = lambda v: {"mean": v, "stderr": 0.0}  # noqa: E731
    rows = [{"method": f"m{i}", "metrics": {"collateral@budget=0.1": metric(0.05 * i), "forget_em_drop@budget=0.1": metric(0.5),
                                            "collateral@budget=0.3": metric(0.1 + 0.05 * i), "forget_em_drop@budget=0.3": metric(1.0)}}
            for i in range(3)]
    made = task_plots(rows, tmp_path, "spec", params={"max_ppl_increase": 0.5})
    assert made[0]["file"] == "spec-frontier.svg" and (tmp_path / "spec-frontier.svg").read_text().lstrip().startswith("<?xml")


def test_prediction_page_plots_predicted_against_true_m(tmp_path):
    from memeval.leaderboard.plots import task_plots

    metric = lambda v: {"mean": v, "stderr": 0.01}  # noqa: E731
    rows = [{"method": m, "metrics": {f"predicted_m@bin={c}": metric(v) for c, v in zip((0.1, 0.5, 0.9), vals)}}
            for m, vals in (("entropy", (0.2, 0.4, 0.6)), ("transformer_predictor", (0.1, 0.5, 0.85)))]
    made = task_plots(rows, tmp_path, "pred")
    assert [m["file"] for m in made] == ["pred-calibration.svg"]
    assert (tmp_path / "pred-calibration.svg").read_text().lstrip().startswith("<?xml")
    assert task_plots([{"method": "x", "metrics": {"token_auc": metric(0.7)}}], tmp_path, "none") == []
