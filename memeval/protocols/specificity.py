"""Specificity: after an edit that removes a forget set, what else broke? (DESIGN §6, issue 6)

Each item is one seeded forget set (``set_size`` memorized sequences). An editor edits the model with that
forget set and a retain set of general text (the organism's non-planted training documents of
``data.retain_kinds``, or ``data.retain_path``) at every budget of ``params.budgets``; a localizer goes through
:func:`memeval.adapters.localize_then_ablate` (mean attribution over the forget set, zero the top ``budget``
fraction of neurons of the layers not in ``skip_layers``). Budgets are in each method's own unit (fraction
of neurons pruned, 1 − kept curvature mass, fraction of weights masked, fraction of the unlearning
schedule); the headline is unit-free.

Per budget ``b`` (metrics ``<name>@budget=<b>``):

- ``forget_em_drop``: fraction of the forget set's exact match removed, (EM₀ − EM_b) / EM₀;
  ``forget_em``, ``forget_loose``, ``forget_token_acc``: exact match of the greedy continuation (one
  teacher-forced pass: all suffix tokens are the argmax), loose match (Merullo et al.: the greedy generation
  of ℓ tokens, token Levenshtein distance d to the true suffix, 1 − d/ℓ ≥ ``loose_threshold``) and suffix
  token accuracy;
- ``other_em``, ``other_loose``, ``other_token_acc``: the same on memorized sequences *not* in the forget set;
- ``heldout_ppl`` = exp(token-weighted mean NLL) of held-out text and ``heldout_ppl_increase`` = ppl_b/ppl₀ − 1;
  on an organism the held-out text is of document kinds (``heldout_kinds``: code, arithmetic) disjoint from
  the retain set's (``retain_kinds``: profile, prose), a distribution the editor never saw in any form;
- ``ndcg10``: nDCG@10 of the edited model's top-10 next tokens against the unedited model's, on the
  held-out text (1 = unchanged);
- ``fact_acc``, ``arith_acc``: exact greedy answers to the fact-recall and arithmetic probes.

- ``other_em_drop``: the fraction of the other (not forgotten) memorized sequences' exact match removed;
- ``collateral`` = the largest of ``heldout_ppl_increase``, ``other_em_drop`` and the fractions of fact-recall
  and arithmetic accuracy removed (probes only where the task has them): the worst damage the edit did to
  anything it was not asked to remove.

Headline ``forget_collateral_auc``: :func:`memeval.metrics.forget_collateral_auc` of the points
(collateral, forget_em_drop) over the budgets, bounded at ``max_ppl_increase`` (the collateral bound, 0.5).
An editor that erases every memorized sequence (the forget set *and* the others) has collateral ≈ 1 and
scores 0, however little perplexity it costs.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from memeval.adapters import as_editor
from memeval.api import Batch, Editor, Method, SequenceSet, TokenSequence
from memeval.errors import UsageError
from memeval.metrics import (NDCG_K, forget_collateral_auc, fraction_removed, loose_match,
                             ndcg_at_k, perplexity, relative_increase, suffix_exact_match, token_correct,
                             token_nll)
from memeval.models import NeuronModel
from memeval.protocols.base import Protocol
from memeval.protocols.measure import SampleLog
from memeval.protocols.sources import beside, load_token_rows, organism_for, resolve_path, texts_to_sequences

PAPER_DATA = ("put the memorized sequences (JSONL with input_ids and prefix_len, or a .pt LongTensor), held-out "
              "and general text (.pt LongTensor [N, T] or JSONL input_ids) under $MEMEVAL_DATA/specificity "
              "(see tasks/specificity_paper/README in the task descriptions)")


@dataclass
class SpecificityData:
    source: str = "organism"  # organism | file
    path: str | None = None  # file: memorized sequences (.pt [N, T] or JSONL input_ids/prefix_len)
    prefix_tokens: int | None = None  # file: prefix length when the rows do not give one
    ppl_path: str | None = None  # file: held-out text (input_ids | text) for perplexity and nDCG@10; default: heldout.jsonl beside path
    retain_path: str | None = None  # file: general text (tokens) handed to editors as the retain set
    # organism: the document kinds of the retain set and of the held-out text; disjoint, so the perplexity
    # is measured on a distribution the editor never saw in any form (it may fine-tune on the retain set)
    retain_kinds: list[str] = field(default_factory=lambda: ["profile", "prose"])
    heldout_kinds: list[str] = field(default_factory=lambda: ["code", "arithmetic"])
    facts_path: str | None = None  # file: optional JSONL {prompt, answer} fact-recall probes
    arithmetic_path: str | None = None  # file: optional JSONL {prompt, answer} arithmetic probes
    others: int = 64  # memorized-but-not-forgotten sequences re-measured per item
    ppl_sequences: int = 64
    ppl_tokens: int = 128
    retain_sequences: int = 128
    retain_tokens: int = 128
    probes: int = 200  # fact and arithmetic probes each (0: skip)

    def __post_init__(self) -> None:
        if self.source not in ("organism", "file"):
            raise ValueError(f"source must be organism or file, got {self.source!r}")
        if self.source == "file":
            self.ppl_path = beside(self.path, self.ppl_path, "heldout.jsonl")
        if not self.retain_kinds or not self.heldout_kinds:
            raise ValueError("retain_kinds and heldout_kinds must each name at least one document kind")
        shared = sorted(set(self.retain_kinds) & set(self.heldout_kinds))
        if shared:
            raise ValueError(f"retain_kinds and heldout_kinds must be disjoint (the held-out perplexity is on text "
                             f"the editor never saw), both contain {', '.join(shared)}")


@dataclass
class SpecificityParams:
    budgets: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    set_size: int = 16
    sets: int = 3
    skip_layers: list[int] = field(default_factory=lambda: [0])  # localizers (localize_then_ablate)
    max_ppl_increase: float = 0.5  # bound of the AUC's x axis (+50% perplexity)
    loose_threshold: float = 0.75

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be in (0, 1], got {self.budgets}")
        if self.set_size < 1 or self.sets < 1:
            raise ValueError("set_size and sets must be positive")
        if self.max_ppl_increase <= 0:
            raise ValueError("max_ppl_increase must be positive")


@dataclass
class SeqScores:
    em: list[bool]
    loose: list[bool]
    token_acc: list[float]


PER_BUDGET = {  # name -> higher is better (the forget metric first: the leaderboard's x axis)
    "forget_em_drop": True, "heldout_ppl_increase": False, "forget_em": False, "forget_loose": False,
    "forget_token_acc": False, "other_em": True, "other_loose": True, "other_token_acc": True,
    "heldout_ppl": False, "ndcg10": True, "fact_acc": True, "arith_acc": True,
    "other_em_drop": False, "collateral": False,
}


def budget_key(name: str, budget: float) -> str:
    return f"{name}@budget={budget:g}"


@torch.no_grad()
def score_sequences(model: NeuronModel, seqs: list[TokenSequence], threshold: float = 0.75,
                    batch_size: int = 64, loose: bool = True) -> SeqScores:
    """Exact match and suffix token accuracy of each sequence (one teacher-forced pass), and its loose match
    (Merullo et al. 2025): the greedy generation of ℓ tokens from the prefix against the true suffix, token
    Levenshtein d, similarity 1 − d/ℓ ≥ ``threshold``. ``loose=False`` skips the generation (probes)."""
    from memeval.generation import greedy_match

    em, acc = [], []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        batch = Batch.from_sequences(chunk, model.pad_id, model.device)
        logits = model.logits(batch)
        correct = token_correct(logits, batch.input_ids)
        em.extend(suffix_exact_match(correct, batch.loss_mask).tolist())
        acc.extend(((correct & batch.loss_mask).sum(-1) / batch.loss_mask.sum(-1).clamp(min=1)).tolist())
    matches = [loose_match(m.continuation, s.input_ids[s.prefix_len:], threshold)
               for s, m in zip(seqs, greedy_match(model, seqs, batch_size))] if loose else [False] * len(seqs)
    return SeqScores(em, matches, acc)


@torch.no_grad()
def heldout_pass(model: NeuronModel, seqs: list[TokenSequence], reference: list[torch.Tensor] | None = None,
                 batch_size: int = 32) -> tuple[float, list[torch.Tensor], float]:
    """Mean token NLL over the held-out text, the top-10 next tokens of every scored position (one tensor
    per batch, on CPU) and, given the reference top-10s, the mean nDCG@10 over those positions."""
    total, count, tops, ndcg_sum = 0.0, 0, [], 0.0
    for i, start in enumerate(range(0, len(seqs), batch_size)):
        batch = Batch.from_sequences(seqs[start : start + batch_size], model.pad_id, model.device)
        logits = model.logits(batch)
        scored = batch.loss_mask.clone()
        scored[:, 0] = False  # the first token has no prediction (a prefix_len-0 row marks it)
        nll = token_nll(logits, batch.input_ids)
        total += float((nll * scored).sum())
        count += int(scored.sum())
        pred = torch.zeros_like(scored)
        pred[:, :-1] = scored[:, 1:]  # positions predicting a scored token
        top = logits[pred].float().topk(NDCG_K, dim=-1).indices.cpu()
        tops.append(top)
        if reference is not None:
            ndcg_sum += float(ndcg_at_k(top, reference[i]).sum())
    positions = sum(t.shape[0] for t in tops)
    return total / count, tops, (ndcg_sum / positions if reference is not None else float("nan"))


def probe_sequences(pairs: list[tuple[str, str]], tokenizer, tag: str) -> list[TokenSequence]:
    """(prompt, answer) probes as sequences whose suffix is the answer (as the organism measures them)."""
    out = []
    for i, (prompt, answer) in enumerate(pairs):
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + answer)["input_ids"]
        k = len(p) if full[: len(p)] == p else next(j for j, (a, b) in enumerate(zip(p, full)) if a != b)
        if 0 < k < len(full):
            out.append(TokenSequence(f"{tag}{i}", tuple(full), k))
    return out


def organism_texts(org, data: SpecificityData, seed: int, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The held-out documents and the retain texts of an organism-source task.

    Held-out: the organism's never-trained-on documents of ``data.heldout_kinds``, taken in turn from each
    kind (so every kind is equally represented), the first ``ppl_sequences``. Retain: the non-planted training
    documents of ``data.retain_kinds``, seeded shuffle, the first ``retain_sequences``. The kinds are disjoint
    (:class:`SpecificityData` checks it): an editor that fine-tunes on the retain set (gradient ascent, NPO)
    cannot lower the held-out perplexity by training on its distribution."""
    documents = org.heldout_documents
    known = sorted({h["kind"] for h in documents})
    for key, kinds in (("retain_kinds", data.retain_kinds), ("heldout_kinds", data.heldout_kinds)):
        unknown = [k for k in kinds if k not in known]
        if unknown:
            raise UsageError(f"{where}: data.{key}: unknown document kind {unknown[0]!r}; the organism has "
                             f"{', '.join(known)}")
    by_kind = [[h for h in documents if h["kind"] == k] for k in data.heldout_kinds]
    interleaved = [doc for group in itertools.zip_longest(*by_kind) for doc in group if doc is not None]
    docs = [x["text"] for x in org.train_documents() if not x.get("planted_id") and x["kind"] in data.retain_kinds]
    random.Random(f"retain-{seed}").shuffle(docs)
    return interleaved[: data.ppl_sequences], docs[: data.retain_sequences]


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


class SpecificityProtocol(Protocol):
    name = "specificity"
    summary = "Edit a model to forget a set of memorized sequences over a budget sweep; measure what else breaks"
    accepts = ("editor", "localizer")
    Data = SpecificityData
    Params = SpecificityParams

    @classmethod
    def check_task(cls, task) -> None:
        d = task.data
        if d.source == "file":
            resolve_path(d.path, "the memorized sequences", PAPER_DATA)
            resolve_path(d.ppl_path, "the held-out text", PAPER_DATA)
            resolve_path(d.retain_path, "the retain (general) text", PAPER_DATA)
            for p, what in ((d.facts_path, "the fact probes"), (d.arithmetic_path, "the arithmetic probes")):
                if p:
                    resolve_path(p, what, PAPER_DATA)

    # -- data ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        memorized, heldout, retain, facts, arith = self._load()
        if len(memorized) < self.params.set_size + 1:
            raise UsageError(f"{self.task.path}: {len(memorized)} memorized sequences; specificity needs more "
                             f"than set_size = {self.params.set_size}")
        self.memorized = {s.id: s for s in memorized}
        ids = list(self.memorized)
        self.sets = {}
        for j in range(self.params.sets):
            rng = random.Random(f"specificity-{self.seed}-{j}")
            members = sorted(rng.sample(ids, self.params.set_size))
            rest = [i for i in ids if i not in set(members)]
            rng.shuffle(rest)
            self.sets[f"set{j}"] = (members, sorted(rest[: self.data.others] if self.data.others else rest))
        self.heldout, self.retain = heldout, SequenceSet(retain, self.model.pad_id)
        self.facts, self.arith = facts, arith
        self.before = self._measure_base()
        self.sample_log = SampleLog(self.model)

    def _load(self):
        tok = self.model.tokenizer
        d = self.data
        if d.source == "organism":
            org = organism_for(self.task.model)
            memorized = [TokenSequence(m["id"], tuple(m["input_ids"]), int(m["prefix_len"])) for m in org.memorized]
            heldout_docs, retain_texts = organism_texts(org, d, self.seed, str(self.task.path))
            heldout = texts_to_sequences([h["text"] for h in heldout_docs], tok, d.ppl_tokens, 0, "heldout")
            retain = texts_to_sequences(retain_texts, tok, d.retain_tokens, 0, "retain")
            facts = probe_sequences(org.facts[: d.probes], tok, "fact") if d.probes else []
            arith = probe_sequences(org.arithmetic[: d.probes], tok, "arith") if d.probes else []
            return memorized, heldout, retain, facts, arith
        memorized = load_token_rows(resolve_path(d.path, "the memorized sequences", PAPER_DATA), d.prefix_tokens or 32, tok)

        def text(path, what, n):
            rows = load_token_rows(resolve_path(path, what, PAPER_DATA), 0, tok)[:n]
            return [TokenSequence(s.id, s.input_ids[: d.ppl_tokens if what == "the held-out text" else d.retain_tokens], 0)
                    for s in rows]

        heldout = text(d.ppl_path, "the held-out text", d.ppl_sequences)
        retain = text(d.retain_path, "the retain (general) text", d.retain_sequences)

        def probes(path, what, tag):
            if not path or not d.probes:
                return []
            rows = [json.loads(l) for l in resolve_path(path, what, PAPER_DATA).read_text().splitlines() if l.strip()]
            return probe_sequences([(r["prompt"], r["answer"]) for r in rows[: d.probes]], tok, tag)

        return (memorized, heldout, retain, probes(d.facts_path, "the fact probes", "fact"),
                probes(d.arithmetic_path, "the arithmetic probes", "arith"))

    def _measure_base(self) -> dict[str, Any]:
        seqs = list(self.memorized.values())
        s = score_sequences(self.model, seqs, self.params.loose_threshold)
        per = {q.id: (e, l, a) for q, e, l, a in zip(seqs, s.em, s.loose, s.token_acc)}
        nll, tops, _ = heldout_pass(self.model, self.heldout)
        return {"per": per, "nll": nll, "ppl": perplexity(nll), "tops": tops,
                "fact": _mean(score_sequences(self.model, self.facts, loose=False).em) if self.facts else float("nan"),
                "arith": _mean(score_sequences(self.model, self.arith, loose=False).em) if self.arith else float("nan")}

    # -- the task's shape ---------------------------------------------------------------------
    def items(self) -> list[str]:
        return list(self.sets)

    def metrics(self) -> dict[str, bool]:
        out = {"forget_collateral_auc": True, "forget_em_before": True, "other_em_before": True,
               "heldout_ppl_before": False}
        if self.facts or not hasattr(self, "facts"):
            out["fact_acc_before"] = True
        if self.arith or not hasattr(self, "arith"):
            out["arith_acc_before"] = True
        for b in self.params.budgets:
            for name, higher in PER_BUDGET.items():
                out[budget_key(name, b)] = higher
        return out

    def primary_metric(self) -> str:
        return "forget_collateral_auc"

    # -- scoring ------------------------------------------------------------------------------
    def measure(self, model: NeuronModel, members: list[str], others: list[str]) -> dict[str, float]:
        """Every per-budget metric (without the suffix) of ``model`` on one item."""
        th = self.params.loose_threshold
        f = score_sequences(model, [self.memorized[i] for i in members], th)
        o = score_sequences(model, [self.memorized[i] for i in others], th)
        nll, _, ndcg = heldout_pass(model, self.heldout, self.before["tops"])
        ppl = perplexity(nll)
        em0 = _mean(self.before["per"][i][0] for i in members)
        out = {
            "forget_em_drop": fraction_removed(_mean(f.em), em0),
            "heldout_ppl_increase": relative_increase(ppl, self.before["ppl"]),
            "forget_em": _mean(f.em), "forget_loose": _mean(f.loose), "forget_token_acc": _mean(f.token_acc),
            "other_em": _mean(o.em), "other_loose": _mean(o.loose), "other_token_acc": _mean(o.token_acc),
            "heldout_ppl": ppl, "ndcg10": ndcg,
        }
        out["other_em_drop"] = fraction_removed(out["other_em"], _mean(self.before["per"][i][0] for i in others))
        losses = [out["heldout_ppl_increase"], out["other_em_drop"]]
        if self.facts:
            out["fact_acc"] = _mean(score_sequences(model, self.facts, loose=False).em)
            losses.append(fraction_removed(out["fact_acc"], self.before["fact"]))
        if self.arith:
            out["arith_acc"] = _mean(score_sequences(model, self.arith, loose=False).em)
            losses.append(fraction_removed(out["arith_acc"], self.before["arith"]))
        out["collateral"] = max(losses)
        return out

    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, float]]:
        editor = as_editor(method, self.params.skip_layers)
        return [self._evaluate_item(editor, i) for i in item_ids]

    def _evaluate_item(self, editor: Editor, item: str) -> dict[str, float]:
        members, others = self.sets[item]
        forget = SequenceSet([self.memorized[i] for i in members], self.model.pad_id)
        base = self.before
        metrics: dict[str, float] = {
            "forget_em_before": _mean(base["per"][i][0] for i in members),
            "other_em_before": _mean(base["per"][i][0] for i in others),
            "heldout_ppl_before": base["ppl"],
        }
        if self.facts:
            metrics["fact_acc_before"] = base["fact"]
        if self.arith:
            metrics["arith_acc_before"] = base["arith"]
        points, after = [], {}
        for b in self.params.budgets:
            edited = editor.edit(self.model, forget, self.retain, b)
            if edited is self.model:
                raise RuntimeError(f"{editor.name}: edit returned the model it was given (it must return a new one)")
            m = self.measure(edited, members, others)
            if self.log_samples:
                after[f"after@{b:g}"] = self.sample_log.continuations(edited, list(forget.sequences))
            del edited
            points.append((m["collateral"], m["forget_em_drop"]))
            metrics.update({budget_key(k, b): v for k, v in m.items()})
        metrics["forget_collateral_auc"] = forget_collateral_auc(points, self.params.max_ppl_increase)
        if self.log_samples:
            metrics["samples"] = self.sample_log.rows(list(forget.sequences), after)
        return metrics
