"""A-priori memorization detection (Dentan et al., "Predicting memorization within LLMs fine-tuned for
classification", ECAI 2025): from an early checkpoint of a classifier trained with planted label noise,
which of its training samples will it have memorized at the end?

Design (leave-one-out LiRA, Carlini et al. 2022): a pool of N models, each trained on a seeded random half
of a labelled pool (``memeval.shadows``). Item ``target-t`` uses model t as the target and the other N − 1
models (or the first K of them, ``params.shadows``) as its shadows:

- ground truth, per training sample x of the target: local log-LiRA on the logit gap at the *final*
  checkpoints (:func:`memeval.metrics.local_lira`); memorized when ≥ η (default 4, the paper's v3 rule) or,
  with ``top_q``, when among the top q of the target's samples (the v1 rule). Samples with fewer than two
  IN or two OUT shadows have no ground truth and are left out of the item;
- the detector receives model t at its prediction checkpoint (the paper's rule:
  :func:`memeval.shadows.prediction_checkpoint`, recorded in each model's ``member.json``) and t's
  training samples with their training labels, nothing else (a detector declaring
  ``requires = ("shadows",)`` also gets the shadows at their prediction checkpoints, with membership);
- metrics per target: ``auc`` (primary), ``fpr@tpr=0.75``, ``tpr@fpr=0.01``, ``precision@k`` with k the
  number of memorized samples, and ``tpr@fpr=<x>`` on a grid (the ROC curve, averaged vertically over
  targets on the leaderboard). The runner's mean ± s.e. over items is over targets, i.e. over training seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from memeval.api import Method, ShadowModels
from memeval.errors import UsageError
from memeval.metrics import fpr_at_tpr, local_lira, logit_gap, precision_at_k, roc_auc, tpr_at_fpr
from memeval.protocols.base import Protocol
from memeval.protocols.sources import resolve_path
from memeval.shadows import EARLY, FINAL, Setup, Train, member_info, train_pool

ROC_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # FPR values of the stored ROC curve (plus 0.01, a headline)
PAPER_DATA = ("the pool JSONL ({\"prompt\": ..., \"label\": ...} per line: ARC, ETHICS or MMLU rendered as "
              "multiple-choice prompts ending where the answer letter follows); set data.path")
DEFAULTS = {  # training recipe per source when params leave it unset
    "digits": dict(epochs=60, batch_size=64, lr=2e-3),
    "organism": dict(epochs=12, batch_size=16, lr=5e-4),
    "file": dict(epochs=1, batch_size=4, lr=2.5e-5),
}
console = Console(stderr=True)


@dataclass
class DetectionData:
    source: str = "digits"  # digits (scikit-learn) | organism (the organism's world) | file (JSONL)
    path: str | None = None  # file: JSONL of {"prompt", "label"[, "id"]}
    labels: list[str] = field(default_factory=list)  # file: label strings in class order (e.g. [A, B, C, D])
    pool: int = 0  # pool size (0: digits all 1,797; organism 400; file all rows)
    max_tokens: int = 24  # organism: document tokens before the question

    def __post_init__(self) -> None:
        if self.source not in ("digits", "organism", "file"):
            raise ValueError(f"source must be digits, organism or file, got {self.source!r}")
        if self.pool < 0:
            raise ValueError(f"pool must be >= 0, got {self.pool}")
        if self.source == "file" and len(self.labels) < 2:
            raise ValueError("source file needs labels: the label strings in class order (at least 2)")


@dataclass
class DetectionParams:
    models: int = 16  # N: every model is one target (an item) and a shadow of the others
    shadows: int | None = None  # K shadows per target: the first K other models (default N − 1)
    noise: float = 0.03334  # fraction of the pool's labels reassigned to another class (the paper's 3.334 %)
    eta: float = 4.0  # memorized when log-LiRA ≥ eta (Dentan et al. v3)
    top_q: float | None = None  # instead: memorized when in the top q fraction of the target's samples (v1: 0.1)
    checkpoints: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7])
    epochs: int | None = None  # training recipe (None: the source's default)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    hidden: list[int] = field(default_factory=lambda: [128, 128])  # digits: MLP widths
    lora_r: int = 0  # LM sources: 0 = full fine-tuning, else LoRA rank (needs peft)
    threads: int = 1  # torch threads while training one model

    def __post_init__(self) -> None:
        k = self.models - 1 if self.shadows is None else self.shadows
        if self.models < 2 or k < 4:
            raise ValueError(f"needs at least 4 shadows per target (K = {k}; models {self.models}"
                             f"{'' if self.shadows is None else f', shadows {self.shadows}'}): LiRA fits a mean "
                             f"and a standard deviation to the IN and the OUT shadows of every sample")
        if k > self.models - 1:
            raise ValueError(f"shadows {self.shadows} exceeds models - 1 = {self.models - 1}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"eta must be a positive log-likelihood ratio (the paper uses 4), got {self.eta}")
        if self.top_q is not None and not 0 < self.top_q < 1:
            raise ValueError(f"top_q must be a fraction in (0, 1), got {self.top_q}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be a fraction in [0, 1), got {self.noise}")
        if not self.checkpoints:
            raise ValueError("checkpoints must list at least one fraction of training")
        for f in self.checkpoints:
            if not 0 < f < 1:
                raise ValueError(f"checkpoints: {f} is not a fraction of training in (0, 1)")
        if sorted(set(self.checkpoints)) != list(self.checkpoints):
            raise ValueError(f"checkpoints must be strictly increasing, got {self.checkpoints}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def k(self) -> int:
        return self.models - 1 if self.shadows is None else self.shadows


class PoolHandle:
    """What the runner holds for a detection task: the protocol trains and loads its own models. Its
    fingerprint is constant; the protocol checks each target's weights itself."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.hf = None

    def fingerprint(self) -> str:
        return f"detection:{self.spec}"


def build_setup(task, device: torch.device | str, dtype: torch.dtype, seed: int) -> Setup:
    """The :class:`memeval.shadows.Setup` of a detection task."""
    from memeval.classifiers import DigitsSetup, LMSetup

    d, p = task.data, task.params
    rec = {**DEFAULTS[d.source], **{k: v for k, v in (("epochs", p.epochs), ("batch_size", p.batch_size),
                                                      ("lr", p.lr)) if v is not None}}
    train = Train(weight_decay=p.weight_decay, checkpoints=tuple(p.checkpoints), threads=p.threads, **rec)
    common = dict(seed=seed, n_models=p.models, noise=p.noise, train=train, device=str(device))
    if d.source == "digits":
        return DigitsSetup(hidden=tuple(p.hidden), pool_size=d.pool, **common)
    dtype_name = str(dtype).removeprefix("torch.")
    path = str(resolve_path(d.path, "the detection pool", PAPER_DATA)) if d.source == "file" else None
    return LMSetup(model=task.model, source=d.source, path=path, labels=tuple(d.labels),
                   pool_size=d.pool or (400 if d.source == "organism" else 0), max_tokens=d.max_tokens,
                   lora_r=p.lora_r, dtype=dtype_name, **common)


class DetectionProtocol(Protocol):
    name = "detection"
    summary = "Predict from an early checkpoint which training samples a classifier will memorize (LiRA truth)"
    accepts = ("detector",)
    Data = DetectionData
    Params = DetectionParams

    @classmethod
    def check_task(cls, task) -> None:
        if task.data.source == "digits" and task.model != "mlp":
            raise UsageError(f"{task.path}: source digits trains its own MLP; set model: mlp (got {task.model!r})")
        if task.data.source == "file":
            resolve_path(task.data.path, "the detection pool", PAPER_DATA)

    @classmethod
    def load_model(cls, task, device, dtype) -> PoolHandle:
        if task.data.source != "digits":  # fail now, in one line, when the base weights are missing
            from memeval.classifiers import _base_lm

            _base_lm(task.model, str(dtype).removeprefix("torch."))
        return PoolHandle(task.model, device, dtype)

    # -- models and ground truth ------------------------------------------------------------------
    def prepare(self) -> None:
        p = self.params
        self.setup = build_setup(self.task, self.model.device, self.model.dtype, self.seed)
        self.pool = self.setup.pool()
        if len(self.pool) < 8:
            raise UsageError(f"{self.task.path}: the pool has {len(self.pool)} samples; expected at least 8")
        self.membership = self.setup.membership()
        self.paths = train_pool(self.setup)
        everything = self.pool.samples(range(len(self.pool)))
        gaps = []
        for path in self.paths:  # logit gap of every pool sample on every final model
            view = self.setup.view(self.setup.load(path / f"{FINAL}.pt", self.model.device))
            gaps.append(logit_gap(view.class_logits(everything).cpu(), self.pool.labels))
        self.final_gaps = torch.stack(gaps)
        self.truth: dict[int, dict[str, torch.Tensor]] = {}
        for t in range(p.models):
            rows = self.membership[t].nonzero().flatten()
            shadows = self.shadows_of(t)
            memo = local_lira(self.final_gaps[t, rows], self.final_gaps[shadows][:, rows],
                              self.membership[shadows][:, rows])
            keep = ~torch.isnan(memo)
            if p.top_q is not None:
                cut = torch.quantile(memo[keep], 1 - p.top_q)
                memorized = memo >= cut
            else:
                memorized = memo >= p.eta
            self.truth[t] = {"rows": rows, "memo": memo, "keep": keep, "memorized": memorized & keep}
        self.report = self._report()
        Path(self.paths[0].parent / f"truth-{self.task.name}.json").write_text(json.dumps(self.report, indent=1))
        r = self.report
        console.print(f"[dim]{self.task.name}: {p.models} models, K = {p.k} shadows per target; memorized "
                      f"{r['memorized_mean']:.1f} of {r['members_mean']:.0f} training samples per target, "
                      f"{r['noise_share_of_memorized']:.0%} of them label noise; prediction checkpoint at "
                      f"{r['prediction_fractions']} of training[/dim]")

    def shadows_of(self, t: int) -> list[int]:
        """The shadow models of target ``t``: the first K models other than t."""
        return [i for i in range(self.params.models) if i != t][: self.params.k]

    def _report(self) -> dict[str, Any]:
        """Ground-truth statistics (written beside the models as truth-<task>.json and printed)."""
        mem = [int(v["memorized"].sum()) for v in self.truth.values()]
        noisy_mem = [int((self.pool.noisy[v["rows"]] & v["memorized"]).sum()) for v in self.truth.values()]
        noisy = [int(self.pool.noisy[v["rows"]].sum()) for v in self.truth.values()]
        fractions = [member_info(path)["prediction_fraction"] for path in self.paths]
        return {"models": self.params.models, "shadows": self.params.k, "eta": self.params.eta, "top_q": self.params.top_q,
                "members_mean": sum(len(v["rows"]) for v in self.truth.values()) / len(self.truth),
                "memorized": mem, "memorized_mean": sum(mem) / len(mem), "noisy_members": noisy,
                "noisy_memorized": noisy_mem, "noise_share_of_memorized": sum(noisy_mem) / max(1, sum(mem)),
                "noise_memorized_rate": sum(noisy_mem) / max(1, sum(noisy)),
                "clean_memorized_rate": (sum(mem) - sum(noisy_mem)) / max(1, sum(len(v["rows"]) for v in self.truth.values()) - sum(noisy)),
                "prediction_fractions": sorted(set(fractions)),
                "prediction_fraction_per_model": fractions}

    # -- scoring ------------------------------------------------------------------------------------
    def items(self) -> list[str]:
        return [f"target-{t:02d}" for t in range(self.params.models)]

    def metrics(self) -> dict[str, bool]:
        out = {"auc": True, "fpr@tpr=0.75": False, "tpr@fpr=0.01": True, "precision@k": True}
        out.update({f"tpr@fpr={x:g}": True for x in ROC_GRID})
        return out

    def primary_metric(self) -> str:
        return "auc"

    def _early(self, index: int):
        """Model ``index`` at its prediction checkpoint, loaded once and kept (with its fingerprint)."""
        cache = self.__dict__.setdefault("_early_views", {})
        if index not in cache:
            view = self.setup.view(self.setup.load(self.paths[index] / f"{EARLY}.pt", self.model.device))
            cache[index] = (view, view.fingerprint())
        return cache[index][0]

    def _check_unchanged(self, indices: list[int]) -> None:
        """A detector must leave every model it was given as it was: a changed one is dropped (reloaded
        on next use) and the item fails."""
        cache = self.__dict__.get("_early_views", {})
        changed = [i for i in indices if i in cache and cache[i][0].fingerprint() != cache[i][1]]
        for i in changed:
            del cache[i]
        if changed:
            raise RuntimeError("the detector modified the model's weights (fingerprint changed)")

    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, float | None]]:
        out = []
        for item in item_ids:
            t = int(item.removeprefix("target-"))
            truth = self.truth[t]
            samples = self.pool.samples(truth["rows"])
            model = self._early(t)
            given_to = [t]
            if "shadows" in getattr(method, "requires", ()):
                shadows = self.shadows_of(t)
                given_to += shadows
                given = ShadowModels([self._early(s) for s in shadows], self.membership[shadows][:, truth["rows"]])
                scores = method.score(model, samples, given)
            else:
                scores = method.score(model, samples)
            self._check_unchanged(given_to)
            scores = torch.as_tensor(scores).detach().float().cpu().flatten()
            if scores.shape[0] != len(samples):
                raise RuntimeError(f"score returned {scores.shape[0]} scores for {len(samples)} samples")
            if not torch.isfinite(scores).all():
                raise RuntimeError("score returned non-finite scores")
            out.append(score_detection(scores[truth["keep"]], truth["memorized"][truth["keep"]]))
        return out


def score_detection(scores: torch.Tensor, memorized: torch.Tensor) -> dict[str, float | None]:
    """Every detection metric of one target (None where undefined: no memorized or no other sample)."""
    n_pos = int(memorized.sum())
    if n_pos == 0 or n_pos == len(memorized):
        return {"auc": None, "fpr@tpr=0.75": None, "tpr@fpr=0.01": None, "precision@k": None,
                **{f"tpr@fpr={x:g}": None for x in ROC_GRID}}
    metrics = {"auc": roc_auc(scores, memorized), "fpr@tpr=0.75": fpr_at_tpr(scores, memorized, 0.75),
               "tpr@fpr=0.01": tpr_at_fpr(scores, memorized, 0.01),
               "precision@k": precision_at_k(scores, memorized, n_pos)}
    metrics.update({f"tpr@fpr={x:g}": tpr_at_fpr(scores, memorized, x) for x in ROC_GRID})
    return metrics
