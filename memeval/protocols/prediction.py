"""Memorization prediction: will greedy decoding reproduce this training sequence, and which of its tokens?

Two questions, one protocol (Chen, Han & Miyao, EMNLP 2024, §5; Biderman et al., NeurIPS 2023):

- token-level prediction: from the scored model's own hidden states and entropies, predict for each of the ℓ
  continuation tokens whether greedy decoding reproduces it (``data.feature_model`` empty);
- forecasting: from an earlier checkpoint (``data.feature_model: checkpoint@0.25``, or any model spec), predict
  which sequences the final model reproduces exactly.

Items are training sequences: k context + ℓ continuation tokens (organism: every planted sequence, at every
duplication count, and a seeded sample of ordinary training chunks). Ground truth per sequence, computed once
per task: the scored model's greedy match vector m (:func:`memeval.generation.greedy_match`, the teacher-forced
shortcut, proven equal to plain generation in ``tests/test_generation.py``), M = mean m and exact = all m.

An item of the task is one seeded split of the sequences into train / validation / test (``params.splits``
items, fractions ``params.fractions``): the predictor is fitted on train and validation (labelled) and predicts
test, whose labels never leave this module. Metrics on the test sequences (:mod:`memeval.metrics.prediction`):
token accuracy, full accuracy, token ROC AUC, exact-match ROC AUC of the sequence scores, F1 of the matching
class, full accuracy and mean predicted M per bin of true M, and the forecast's precision and recall of the
final model's memorized set. Primary: ``token_auc`` for token-level tasks, ``exact_auc`` for forecasting.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from memeval.api import (
    PREDICTION_FEATURES,
    Method,
    Prediction,
    PredictionExample,
    Predictor,
    TokenSequence,
)
from memeval.errors import UsageError
from memeval.metrics import (
    exact_auc,
    forecast_precision_recall,
    full_accuracy,
    full_accuracy_by_bin,
    majority_token_accuracy,
    memorized_f1,
    predicted_m_by_bin,
    token_accuracy,
    token_auc,
    token_nll,
)
from memeval.models import NeuronModel
from memeval.protocols.base import Protocol
from memeval.protocols.sources import load_token_rows, organism_for, resolve_path

PAPER_DATA = ("the Pythia training rows (deduplicated Pile, first k + ℓ tokens of each row) as a .pt LongTensor "
              "[N, T] or JSONL of input_ids; set data.path (e.g. under $MEMEVAL_DATA/prediction/)")


def checkpoint_fraction(spec: str) -> float:
    """The training fraction of a ``checkpoint@<fraction>`` feature model (a ValueError if malformed)."""
    text = spec.partition("@")[2]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"feature_model '{spec}': expected checkpoint@<fraction of training>, "
                         f"e.g. checkpoint@0.25") from None
    if not 0 < value <= 1:
        raise ValueError(f"feature_model '{spec}': the fraction must be in (0, 1], got {value:g}")
    return value


@dataclass
class PredictionData:
    source: str = "organism"  # organism | file
    path: str | None = None  # file: .pt [N, T] or JSONL (input_ids | text) of training sequences
    prefix_tokens: int | None = None  # k (organism: its prefix length)
    suffix_tokens: int | None = None  # ℓ (organism: its suffix length)
    ordinary: int = 300  # organism: ordinary training chunks sampled beside the planted sequences
    sequences: int | None = None  # at most this many sequences (seeded sample); None: all
    per_bin: int | None = None  # Chen et al.'s sampling: at most this many sequences per value of M (seeded)
    feature_model: str = ""  # "" = the scored model | checkpoint@<fraction> (organism) | a model spec

    def __post_init__(self) -> None:
        if self.source not in ("organism", "file"):
            raise ValueError(f"source must be organism or file, got {self.source!r}")
        for name in ("prefix_tokens", "suffix_tokens", "sequences", "per_bin"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.ordinary < 0:
            raise ValueError(f"ordinary must be 0 or more, got {self.ordinary}")
        if self.feature_model.startswith("checkpoint@"):
            checkpoint_fraction(self.feature_model)


@dataclass
class PredictionParams:
    splits: int = 3  # items: seeded train/validation/test splits
    fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    layer: int = -1  # hidden-state layer offered to predictors (-1: the last)
    bins: int = 5  # bins of true M for the per-bin metrics (Chen et al.'s five levels)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be three positive numbers summing to 1, got {self.fractions}")
        if self.splits < 1:
            raise ValueError(f"splits must be at least 1, got {self.splits}")


def per_score_sample(seqs: list[TokenSequence], truth: dict[str, torch.Tensor], per_bin: int,
                     seed: int) -> list[TokenSequence]:
    """Chen et al.'s sampling (§A4): group the sequences by their score M = i/ℓ and keep at most ``per_bin`` of
    each group (a seeded draw), which roughly balances the score levels. Order: by M, then the draw."""
    groups: dict[int, list[TokenSequence]] = {}
    for s in seqs:
        groups.setdefault(int(truth[s.id].sum()), []).append(s)
    out: list[TokenSequence] = []
    for hits in sorted(groups):
        members = groups[hits]
        out.extend(random.Random(f"per-bin-{seed}-{hits}").sample(members, min(per_bin, len(members))))
    return out


class PredictionProtocol(Protocol):
    name = "prediction"
    summary = "Predict which continuation tokens of training sequences greedy decoding reproduces"
    accepts = ("predictor",)
    Data = PredictionData
    Params = PredictionParams

    @classmethod
    def check_task(cls, task) -> None:
        """One-line errors before any model loads: the data file, an unknown checkpoint, k + ℓ longer than the
        organism's sequences."""
        d = task.data
        if d.source == "file":
            resolve_path(d.path, "the training sequences", PAPER_DATA)
        fm = d.feature_model
        if fm.startswith("checkpoint@") and not task.model.startswith("organism:"):
            raise UsageError(f"{task.path}: data.feature_model '{fm}' needs an organism model; give a model spec "
                             f"(e.g. hf:<repo>@<step>) for other models")
        if task.model.startswith("organism:") and d.source == "organism":
            from memeval.organisms.presets import PRESETS, parse_organism_spec

            preset = PRESETS[parse_organism_spec(task.model.partition(":")[2])[0]]
            total = preset.prefix_len + preset.suffix_len
            k, ell = d.prefix_tokens or preset.prefix_len, d.suffix_tokens or preset.suffix_len
            if k + ell > total:
                raise UsageError(f"{task.path}: data.prefix_tokens + data.suffix_tokens = {k} + {ell} = {k + ell} "
                                 f"exceeds the {total} tokens of {task.model}'s planted sequences")
            if fm.startswith("checkpoint@"):
                fractions = (*preset.checkpoint_fractions, 1.0)
                if not any(abs(checkpoint_fraction(fm) - f) < 1e-9 for f in fractions):
                    raise UsageError(f"{task.path}: data.feature_model '{fm}': {task.model} has checkpoints at "
                                     f"{', '.join(f'{f:g}' for f in fractions)} of training")

    @classmethod
    def skip_reason(cls, task, method_cls) -> str | None:
        if "source_matches" in getattr(method_cls, "features", ()) and not task.data.feature_model:
            return "it reads the feature model's own greedy matches, which on a token-level task are the labels"
        return None

    # -- data and ground truth -------------------------------------------------------------------
    def prepare(self) -> None:
        self.status("loading sequences")
        seqs = self._sequences()
        self.status(f"greedy ground truth of {len(seqs)} sequences")
        from memeval.generation import greedy_match

        greedy = dict(zip((s.id for s in seqs), greedy_match(self.model, seqs, self.params.batch_size)))
        truth = {i: torch.tensor(m.matches, dtype=torch.bool) for i, m in greedy.items()}
        if self.data.per_bin is not None:
            seqs = per_score_sample(seqs, truth, self.data.per_bin, self.seed)
        self.sequences = {s.id: s for s in seqs}
        self.truth = {s.id: truth[s.id] for s in seqs}  # never leaves this module except as train/val labels
        self._greedy = {s.id: greedy[s.id] for s in seqs}  # the scored model's continuations (features reuse them)
        self._features: dict[str, dict[str, torch.Tensor]] = {s.id: {} for s in seqs}
        self.splits: dict[str, tuple[list[str], list[str], list[str]]] = {}
        for j in range(self.params.splits):
            order = list(self.sequences)
            random.Random(f"prediction-{self.seed}-{j}").shuffle(order)
            n_train = int(len(order) * self.params.fractions[0])
            n_val = int(len(order) * self.params.fractions[1])
            parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
            for name, part in zip(("train", "validation", "test"), parts):
                if not part:
                    raise UsageError(f"{self.task.path}: params.fractions {self.params.fractions} leave the {name} "
                                     f"split empty with {len(order)} sequences; use more sequences or larger fractions")
            self.splits[f"split{j}"] = parts
        self.feature_model = self._feature_model()

    def _sequences(self) -> list[TokenSequence]:
        d = self.data
        tok = self.model.tokenizer
        self.groups: dict[str, str] = {}  # sequence id -> "dup=<copies>" (planted) or "ordinary"
        if d.source == "organism":
            org = organism_for(self.task.model)
            k, ell = d.prefix_tokens or org.prefix_len, d.suffix_tokens or org.suffix_len
            short = [p for p in org.planted if len(p["input_ids"]) < k + ell]
            if short:
                raise UsageError(f"{self.task.path}: data.prefix_tokens + data.suffix_tokens = {k + ell} exceeds the "
                                 f"{len(short[0]['input_ids'])} tokens of planted sequence {short[0]['id']}")
            planted = [TokenSequence(p["id"], tuple(p["input_ids"][: k + ell]), k) for p in org.planted]
            self.groups.update({p["id"]: f"dup={p['duplicates']}" for p in org.planted})
            docs = [x["text"] for x in org.train_documents() if not x.get("planted_id")]
            random.Random(f"ordinary-{self.seed}").shuffle(docs)
            ordinary: list[TokenSequence] = []
            for text in docs:  # ordinary training chunks: the first k + ℓ tokens of documents long enough
                if len(ordinary) >= d.ordinary:
                    break
                ids = tok(text)["input_ids"]
                if len(ids) >= k + ell:
                    ordinary.append(TokenSequence(f"ordinary{len(ordinary)}", tuple(ids[: k + ell]), k))
                    self.groups[ordinary[-1].id] = "ordinary"
            seqs = planted + ordinary
        else:
            k, ell = d.prefix_tokens or 32, d.suffix_tokens or 16
            path = resolve_path(d.path, "the training sequences", PAPER_DATA)
            rows = load_token_rows(path, k, tok)
            short = [s for s in rows if len(s.input_ids) < k + ell]
            if short:
                raise UsageError(f"{path}: sequence {short[0].id} has {len(short[0].input_ids)} tokens, fewer than "
                                 f"data.prefix_tokens + data.suffix_tokens = {k} + {ell}")
            seqs = [TokenSequence(s.id, s.input_ids[: k + ell], k) for s in rows]
        if d.sequences is not None and len(seqs) > d.sequences:
            seqs = random.Random(f"sample-{self.seed}").sample(seqs, d.sequences)
        if len(seqs) < 10:
            raise UsageError(f"{self.task.path}: {len(seqs)} sequences; prediction needs at least 10")
        return seqs

    def _feature_model(self) -> NeuronModel:
        fm = self.data.feature_model
        if not fm:
            return self.model
        from memeval.loading import load_model

        if fm.startswith("checkpoint@"):
            org = organism_for(self.task.model)
            fraction = checkpoint_fraction(fm)
            fractions = org.checkpoint_fractions
            hits = [i for i, f in enumerate(fractions) if abs(f - fraction) < 1e-9]
            if not hits:
                raise UsageError(f"{self.task.path}: data.feature_model {fm}: the organism has checkpoints at "
                                 f"{', '.join(f'{f:g}' for f in fractions)}")
            path = org.checkpoints[hits[0]]
            return load_model(str(path), self.model.device, self.model.dtype)
        return load_model(fm, self.model.device, self.model.dtype)

    # -- features ------------------------------------------------------------------------------
    def _ensure(self, names: tuple[str, ...]) -> None:
        """Compute the requested features of every sequence once (shared by every predictor of the task)."""
        unknown = [n for n in names if n not in PREDICTION_FEATURES]
        if unknown:
            raise RuntimeError(f"unknown prediction feature(s) {unknown}; offered: {', '.join(PREDICTION_FEATURES)}")
        seqs = list(self.sequences.values())
        missing = [n for n in names if n not in self._features[seqs[0].id]]
        if not missing:
            return
        fm = self.feature_model
        if "zlib" in missing:
            for s in seqs:
                raw = fm.tokenizer.decode(list(s.input_ids)).encode()
                self._features[s.id]["zlib"] = torch.tensor([len(zlib.compress(raw)) / max(1, len(raw))])
        if "loss" in missing:
            self._teacher_forced_loss(seqs)
        if {"hidden", "entropy", "source_matches"} & set(missing):
            self._generated_features(seqs, {"hidden", "entropy", "source_matches"} & set(missing))

    @torch.no_grad()
    def _teacher_forced_loss(self, seqs: list[TokenSequence]) -> None:
        from memeval.api import Batch

        fm = self.feature_model
        for start in range(0, len(seqs), self.params.batch_size):
            chunk = seqs[start : start + self.params.batch_size]
            batch = Batch.from_sequences(chunk, fm.pad_id, fm.device)
            nll = token_nll(fm.logits(batch), batch.input_ids).float().cpu()
            for row, s in enumerate(chunk):
                self._features[s.id]["loss"] = nll[row, s.prefix_len : len(s.input_ids)].clone()

    @torch.no_grad()
    def _generated_features(self, seqs: list[TokenSequence], wanted: set[str]) -> None:
        """One forward pass of context + the feature model's greedy continuation: hidden states of a layer at
        every position, entropy at each generation step, and the feature model's match vector."""
        from memeval.api import Batch
        from memeval.generation import greedy_match

        fm = self.feature_model
        matches = ([self._greedy[s.id] for s in seqs] if fm is self.model  # token-level: computed in prepare
                   else greedy_match(fm, seqs, self.params.batch_size))
        generated = [TokenSequence(s.id, tuple(s.input_ids[: s.prefix_len]) + tuple(m.continuation), s.prefix_len)
                     for s, m in zip(seqs, matches)]
        for s, m in zip(seqs, matches):
            if "source_matches" in wanted:
                self._features[s.id]["source_matches"] = torch.tensor(m.matches, dtype=torch.float32)
        if not {"hidden", "entropy"} & wanted:
            return
        for start in range(0, len(generated), self.params.batch_size):
            chunk = generated[start : start + self.params.batch_size]
            batch = Batch.from_sequences(chunk, fm.pad_id, fm.device)
            out = fm.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).cpu()
            hidden = out.hidden_states[self.params.layer].float().cpu()
            for row, s in enumerate(chunk):
                n, k = len(s.input_ids), s.prefix_len
                if "entropy" in wanted:
                    self._features[s.id]["entropy"] = entropy[row, k - 1 : n - 1].clone()
                if "hidden" in wanted:
                    self._features[s.id]["hidden"] = hidden[row, : n - 1].clone()

    def _examples(self, ids: list[str], names: tuple[str, ...], labelled: bool) -> list[PredictionExample]:
        return [PredictionExample(i, self.sequences[i].input_ids, self.sequences[i].prefix_len,
                                  {n: self._features[i][n] for n in names},
                                  tuple(self.truth[i].tolist()) if labelled else None) for i in ids]

    # -- items and metrics ---------------------------------------------------------------------
    def items(self) -> list[str]:
        return list(self.splits)

    def forecasting(self) -> bool:
        return bool(self.data.feature_model)

    def metrics(self) -> dict[str, bool]:
        out = {"token_accuracy": True, "full_accuracy": True, "token_auc": True, "exact_auc": True,
               "memorized_f1": True, "forecast_precision": True, "forecast_recall": True,
               "majority_token_accuracy": True, "test_exact": True, "selected_on_test": False}
        for b in range(self.params.bins):
            out[f"full_accuracy@bin={self._centre(b):g}"] = True
            out[f"predicted_m@bin={self._centre(b):g}"] = True
        for g in self._group_names():
            out[f"token_accuracy@{g}"] = True
            out[f"token_auc@{g}"] = True
        return out

    def _group_names(self) -> list[str]:
        """Duplication groups of the organism's sequences, by copies, then ``ordinary`` (none for file data)."""
        names = {getattr(self, "groups", {}).get(i, "") for i in getattr(self, "sequences", {})} - {""}
        return sorted(names, key=lambda g: (g == "ordinary", int(g[4:]) if g.startswith("dup=") else 0))

    def _centre(self, b: int) -> float:
        return round((b + 0.5) / self.params.bins, 4)

    def primary_metric(self) -> str:
        return "exact_auc" if self.forecasting() else "token_auc"

    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, Any]]:
        if not isinstance(method, Predictor):
            raise TypeError(f"{method.name} is not a predictor")
        names = tuple(method.features)
        if "source_matches" in names and not self.forecasting():  # the runner skips these (skip_reason)
            raise RuntimeError("source_matches is not offered on a token-level task: it would be the labels")
        self._ensure(names)
        return [self._evaluate_split(method, names, i) for i in item_ids]

    def _evaluate_split(self, method: Predictor, names: tuple[str, ...], item: str) -> dict[str, Any]:
        train, val, test = self.splits[item]
        on_test = bool(method.validation_is_test)
        method.fit(self._examples(train, names, True), self._examples(test if on_test else val, names, True))
        preds = method.predict(self._examples(test, names, False))
        if len(preds) != len(test) or not all(isinstance(p, Prediction) for p in preds):
            raise RuntimeError(f"predict returned {len(preds)} predictions for {len(test)} sequences")
        labels = [self.truth[i] for i in test]
        probs = []
        for p, y, i in zip(preds, labels, test):
            t = torch.as_tensor(p.token_probs, dtype=torch.float32).flatten().cpu()
            if t.shape != y.shape or not torch.isfinite(t).all():
                raise RuntimeError(f"{i}: token_probs must be {len(y)} finite probabilities, got shape {tuple(t.shape)}")
            probs.append(t)
        scores = [float(p.score) for p in preds]
        precision, recall = forecast_precision_recall(scores, labels)
        out = {"token_accuracy": token_accuracy(probs, labels), "full_accuracy": full_accuracy(probs, labels),
               "token_auc": token_auc(probs, labels), "exact_auc": exact_auc(scores, labels),
               "memorized_f1": memorized_f1(probs, labels), "forecast_precision": precision,
               "forecast_recall": recall, "majority_token_accuracy": majority_token_accuracy(labels),
               "test_exact": sum(bool(y.all()) for y in labels) / len(labels), "selected_on_test": float(on_test)}
        for b, (acc, pm) in enumerate(zip(full_accuracy_by_bin(probs, labels, self.params.bins),
                                          predicted_m_by_bin(probs, labels, self.params.bins))):
            out[f"full_accuracy@bin={self._centre(b):g}"] = acc
            out[f"predicted_m@bin={self._centre(b):g}"] = pm
        for g in self._group_names():
            rows = [n for n, i in enumerate(test) if self.groups.get(i) == g]
            out[f"token_accuracy@{g}"] = token_accuracy([probs[n] for n in rows], [labels[n] for n in rows]) \
                if rows else None
            out[f"token_auc@{g}"] = token_auc([probs[n] for n in rows], [labels[n] for n in rows]) if rows else None
        return out
