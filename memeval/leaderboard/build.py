"""Render the static leaderboard site from validated result sets.

Everything is validated first; the site is rendered into a temporary directory next to ``out`` and moved
into place only when complete, so an invalid input or a crash never leaves a half-rendered site. An existing
``out`` is replaced only if it is empty or was written by this function (it holds ``.memeval-site``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from memeval.errors import UsageError
from memeval.metrics import paired_difference

from .plots import task_plots
from .validate import RECORDS, SUMMARY, ResultSet, find_result_sets, load_result_set

HERE = Path(__file__).resolve().parent
MARKER = ".memeval-site"
GROUP_ORDER = ["inj", "del", "specificity", "memo_prediction", "apriori_detection"]
OVERVIEW_METRICS = 6  # other metrics shown beside the primary on the overview (all of them on task pages)


@dataclass
class Row:
    """The kept result of one (method, task), with the set it comes from."""

    r: dict[str, Any]
    rs: ResultSet
    set_id: str
    rank: int | None = None
    note: str = ""
    superseded: list[str] = field(default_factory=list)
    prov: dict[str, str] = field(default_factory=dict)
    paired: dict[str, Any] | None = None  # primary metric minus the row ranked just above it, per shared item

    def item_values(self, metric: str) -> dict[str, Any]:
        """The per-item values of ``metric`` in this row's records (item as JSON → value)."""
        per_item = self.rs.item_metrics.get((self.method, self.task, self.r["config_hash"]), {})
        return {item: mets.get(metric) for item, mets in per_item.items()}

    @property
    def method(self) -> str:
        return self.r["method"]

    @property
    def task(self) -> str:
        return self.r["task"]

    @property
    def value(self) -> float | None:
        v = self.r["primary"]["value"]
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------- helpers


def slugify(name: str, used: set[str]) -> str:
    """A file-name-safe slug; names that are not already safe get a short hash, so slugs never collide."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:60] or "x"
    if s != name or s.lower() in used:
        s = f"{s}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    used.add(s.lower())
    return s


def fmt(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "—"
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if a >= 1000 or a < 1e-3 else f"{v:.4g}"


def safe_url(u: Any) -> str | None:
    """Only http(s) links are rendered as links; anything else (javascript:, data:, …) stays text."""
    return u if isinstance(u, str) and re.match(r"^https?://[^\s\"'<>]+$", u) else None


def linkify(text: Any) -> Markup:
    """Escape ``text`` and turn the http(s) URLs in it into links (a paper reference is often 'Authors, URL')."""
    if not isinstance(text, str) or not text:
        return Markup("—")
    parts = re.split(r"(https?://[^\s\"'<>]+[^\s\"'<>.,;:)\]])", text)
    out = Markup("")
    for i, part in enumerate(parts):
        out += Markup('<a href="{0}" rel="noopener">{0}</a>').format(part) if i % 2 else Markup.escape(part)
    return out


def render_markdown(text: str) -> Markup:
    """CONTRIBUTING.md as HTML: CommonMark + tables, raw HTML escaped, relative links turned into text."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it-py comes with rich, a memeval dependency
        return Markup("<pre>{}</pre>").format(text)
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)

    def walk(toks):
        for t in toks:
            if t.children:
                walk(t.children)
            if t.type == "link_open":
                href = t.attrGet("href") or ""
                if not re.match(r"^(https?://|mailto:|#)", href):
                    t.type, t.tag, t.attrs = "span_open", "span", {"class": "reflink", "title": href}

    walk(tokens)
    # close tags of links converted to spans: match them pairwise
    def fix_close(toks):
        stack = []
        for t in toks:
            if t.children:
                fix_close(t.children)
            if t.type in ("link_open", "span_open"):
                stack.append(t.type)
            elif t.type == "link_close" and stack:
                if stack.pop() == "span_open":
                    t.type, t.tag = "span_close", "span"

    fix_close(tokens)
    return Markup(md.renderer.render(tokens, md.options, {}))


def find_contributing() -> Path | None:
    """CONTRIBUTING.md at the root of the memeval checkout this module runs from, else in the working directory."""
    for base in (HERE.parent.parent, Path.cwd()):  # the source checkout, then the working directory
        p = base / "CONTRIBUTING.md"
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------------------------- model


def load_all(results_dirs: list[Path]) -> list[ResultSet]:
    paths: list[Path] = []
    for d in results_dirs:
        for p in find_result_sets(Path(d)):
            if p.resolve() not in {q.resolve() for q in paths}:
                paths.append(p)
    if not paths:
        raise UsageError("RESULTS_DIR: arguments: expected at least one result set directory")
    return [load_result_set(p) for p in paths]


def merge(sets: list[ResultSet], set_ids: list[str]) -> tuple[dict, dict, dict[tuple[str, str], Row], list[str]]:
    """Combine sets: the newer result (by meta.date; a tie goes to the set given later) of each pair wins."""
    methods: dict[str, tuple[Any, dict]] = {}
    tasks: dict[str, tuple[Any, dict]] = {}
    rows: dict[tuple[str, str], Row] = {}
    notes: list[str] = []
    for rs, sid in zip(sets, set_ids):
        for name, m in rs.methods.items():
            if name not in methods or rs.date >= methods[name][0]:
                methods[name] = (rs.date, m)
        for name, t in rs.tasks.items():
            if name not in tasks or rs.date >= tasks[name][0]:
                tasks[name] = (rs.date, t)
        for r in rs.results:
            key = (r["method"], r["task"])
            new = Row(r=r, rs=rs, set_id=sid)
            old = rows.get(key)
            if old is not None:
                keep, drop = (new, old) if rs.date >= old.rs.date else (old, new)
                msg = (f"{key[0]} on {key[1]}: kept the result of {keep.set_id} ({keep.rs.meta['date']}), "
                       f"the newer one; {drop.set_id} ({drop.rs.meta['date']}) was superseded")
                notes.append(msg)
                keep.superseded = old.superseded + [drop.set_id]
                new = keep
            rows[key] = new
    return ({k: v[1] for k, v in methods.items()}, {k: v[1] for k, v in tasks.items()}, rows, notes)


def rank(tasks: dict, rows: dict[tuple[str, str], Row]) -> dict[str, list[Row]]:
    """Rows per task: ranked rows first (competition ranking on the primary), then the unranked ones."""
    per_task: dict[str, list[Row]] = {t: [] for t in tasks}
    for row in rows.values():
        t = tasks[row.task]
        if row.r["errors"] > 0:
            row.note = f"not ranked: {row.r['errors']} errored item{'s' if row.r['errors'] != 1 else ''}"
        elif row.value is None:
            row.note = "not ranked: no value for the primary metric"
        elif row.rs.tasks[row.task]["version"] != t["version"]:
            row.note = f"not ranked: task version {row.rs.tasks[row.task]['version']} (current: {t['version']})"
        per_task[row.task].append(row)
    out = {}
    for name, task_rows in per_task.items():
        hib = tasks[name]["higher_is_better"][tasks[name]["primary"]]
        ranked = sorted((r for r in task_rows if not r.note), key=lambda r: (-r.value if hib else r.value, r.method))
        prev, pos = None, 0
        for i, r in enumerate(ranked, 1):
            if r.value != prev:
                pos, prev = i, r.value
            r.rank = pos
        out[name] = ranked + sorted((r for r in task_rows if r.note), key=lambda r: r.method)
    return out


def pair_with_rank_above(tasks: dict, per_task: dict[str, list[Row]]) -> None:
    """Set ``row.paired`` for every ranked row below the first: the paired difference of the primary metric
    to the row ranked just above it (:func:`memeval.metrics.paired_difference`), and whether it is more than
    two standard errors from zero (``separated``). Rows from different task versions are never compared."""
    for name, rows in per_task.items():
        primary = tasks[name]["primary"]
        ranked = [r for r in rows if r.rank is not None]
        for above, row in zip(ranked, ranked[1:]):
            mean, se, n = paired_difference(row.item_values(primary), above.item_values(primary))
            if n >= 2:
                row.paired = {"mean": mean, "stderr": se, "n": n, "above": above.method,
                              "separated": abs(mean) > 2 * se}


def group_of(task: dict) -> str:
    tags = task.get("tags") or []
    return tags[0] if tags else task["protocol"]


def metric_order(task: dict, rows: list[Row]) -> list[str]:
    """The primary first, then the task's declared metrics, then any others found in the rows."""
    names = [task["primary"]] + [m for m in task["higher_is_better"] if m != task["primary"]]
    for row in rows:
        names += [m for m in row.r["metrics"] if m not in names]
    return names


# ---------------------------------------------------------------------------------------------- render


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["safe_url"] = safe_url
    env.filters["fmt_se"] = lambda v: fmt(v) if fmt(v) in ("—", "0") else f"{v:.2g}"
    env.filters["linkify"] = linkify
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=1, sort_keys=True, ensure_ascii=False)
    env.globals["sortkey"] = lambda v: "" if fmt(v) == "—" else repr(float(v))
    return env


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out}: --out: expected a directory, found a file")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise UsageError(f"{out}: --out: expected a new or empty directory, or a site written by memeval "
                             f"(no {MARKER} file here, refusing to replace its contents)")


def build_site(results_dirs: list[Path], out: Path, contributing: Path | None = None) -> dict:
    """Validate every result set under ``results_dirs`` and render the site into ``out``.

    Each element of ``results_dirs`` is a result set directory (with summary.json and results.jsonl) or a
    directory whose subdirectories hold result sets. Raises ``UsageError`` (one line: file, field, what is
    expected) before writing anything if any set is invalid. Returns counts: pages, plots, sets, methods,
    tasks, ranked, unranked, superseded, and the output path.
    """
    out = Path(out)
    sets = load_all([Path(d) for d in results_dirs])
    _prepare_out(out)
    contributing = contributing if contributing is not None else find_contributing()

    used: set[str] = set()
    set_ids = [slugify(f"{i:02d}-{rs.path.resolve().name}", used) for i, rs in enumerate(sets, 1)]
    methods, tasks, rows, notes = merge(sets, set_ids)
    per_task = rank(tasks, rows)
    pair_with_rank_above(tasks, per_task)
    mslug = {m: slugify(m, used) for m in sorted(methods)}
    tslug = {t: slugify(t, used) for t in sorted(tasks)}

    def prov(rs: ResultSet, sid: str) -> dict:
        m = rs.meta
        return {"id": sid, "version": m["memeval_version"], "commit": m["git_commit"], "short": m["git_commit"][:7], "dirty": m["git_commit"].endswith("-dirty"),
                "device": m["device"], "dtype": m["dtype"], "date": m["date"], "day": m["date"][:10],
                "summary": f"data/{sid}/{SUMMARY}", "records": f"data/{sid}/{RECORDS}"}

    provs = {sid: prov(rs, sid) for rs, sid in zip(sets, set_ids)}
    for row in rows.values():
        row.prov = provs[row.set_id]

    groups: dict[str, list[str]] = {}
    for t in sorted(tasks):
        groups.setdefault(group_of(tasks[t]), []).append(t)
    group_names = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)

    from memeval.leaderboard.stability import find_stability

    stable = find_stability([Path(d) for d in results_dirs])
    task_info = {}
    for t, t_rows in per_task.items():
        order = metric_order(tasks[t], t_rows)
        ns = sorted({r.r["n"] + r.r["errors"] for r in t_rows})
        if isinstance(tasks[t].get("n_items"), int):
            ns = [tasks[t]["n_items"]]
        task_info[t] = {"name": t, "slug": tslug[t], "meta": tasks[t], "rows": t_rows, "metrics": order,
                        "others": order[1:], "overview_metrics": order[1:1 + OVERVIEW_METRICS],
                        "hib": tasks[t]["higher_is_better"], "group": group_of(tasks[t]),
                        "n_items": (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}") if ns else "—",
                        "ranked": [r for r in t_rows if r.rank is not None], "stability": stable.get(t),
                        "unranked": [r for r in t_rows if r.rank is None]}

    method_info = {}
    for m in sorted(methods):
        m_rows = sorted((r for r in rows.values() if r.method == m), key=lambda r: r.task)
        method_info[m] = {"name": m, "slug": mslug[m], "meta": methods[m], "rows": m_rows,
                          "n_ranked": {r.task: len(task_info[r.task]["ranked"]) for r in m_rows}}

    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".memeval-site-", dir=str(out.resolve().parent)))
    try:
        env = _env()
        (tmp / "tasks").mkdir()
        (tmp / "methods").mkdir()
        (tmp / "plots").mkdir()
        shutil.copytree(HERE / "assets", tmp / "assets")
        for rs, sid in zip(sets, set_ids):
            (tmp / "data" / sid).mkdir(parents=True)
            shutil.copy2(rs.summary_path, tmp / "data" / sid / SUMMARY)
            shutil.copy2(rs.records_path, tmp / "data" / sid / RECORDS)
        n_plots = 0
        for t, info in task_info.items():
            info["plots"] = task_plots([r.r for r in info["rows"]], tmp / "plots", info["slug"], info["metrics"],
                                       info["meta"].get("params"))
            n_plots += len(info["plots"])

        common = {"methods": method_info, "tasks": task_info, "groups": [(g, groups[g]) for g in group_names],
                  "sets": [(rs, provs[sid]) for rs, sid in zip(sets, set_ids)], "notes": notes, "mslug": mslug,
                  "tslug": tslug}
        pages = {
            "index.html": ("index.html.j2", {"root": "", "page": "overview"}),
            "data.html": ("data.html.j2", {"root": "", "page": "data"}),
            "submit.html": ("submit.html.j2", {"root": "", "page": "submit",
                                               "contributing": render_markdown(contributing.read_text(encoding="utf-8")) if contributing else None}),
        }
        for t, info in task_info.items():
            pages[f"tasks/{info['slug']}.html"] = ("task.html.j2", {"root": "../", "page": "task", "task": info})
        for m, info in method_info.items():
            pages[f"methods/{info['slug']}.html"] = ("method.html.j2", {"root": "../", "page": "method", "method": info})
        for rel, (tpl, ctx) in pages.items():
            html = env.get_template(tpl).render(**common, **ctx)
            (tmp / rel).write_text(html, encoding="utf-8")
        (tmp / MARKER).write_text("written by memeval.leaderboard.build_site; safe to delete\n")
        (tmp / ".nojekyll").write_text("")
        os.chmod(tmp, 0o755)

        old = None
        if out.exists():
            old = out.parent / f".memeval-site-old-{os.getpid()}-{out.name}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    ranked = sum(len(i["ranked"]) for i in task_info.values())
    return {"pages": len(pages), "plots": n_plots, "sets": len(sets), "methods": len(methods),
            "tasks": len(tasks), "ranked": ranked, "unranked": len(rows) - ranked, "superseded": len(notes),
            "out": str(out)}
