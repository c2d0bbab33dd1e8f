"""A pool of classifiers trained on random halves of one labelled pool: the targets and shadow models of
the a-priori detection protocol (Dentan et al., ECAI 2025 §3; Carlini et al., S&P 2022 for the design).

- ``plant_label_noise``: a seeded fraction of the pool's labels reassigned to another class (3.334 % in
  the paper), so that some samples can only be fitted by memorizing them;
- ``memberships``: model ``i`` trains on a seeded random half of the pool;
- ``train_member(setup, index) -> path``: one model, trained once and cached under
  ``$MEMEVAL_CACHE/detection/<key>`` (built in a temporary directory and renamed into place, a per-key
  ``flock`` against double builds: :func:`memeval.organisms.cache.build_atomically`). It is the unit of work
  a scale-out backend can spread over machines: a killed run never retrains a finished model;
- ``prediction_checkpoint``: the paper's rule for the early checkpoint given to detectors.

A :class:`Setup` says what is trained (``memeval.classifiers`` has the digits MLP and the causal-LM ones).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memeval.api import ClassifierModel, LabeledSamples
from memeval.organisms import cache

POOL_FORMAT = 1  # bump when the training loop or the saved files change: every cached model is retrained
EARLY, FINAL = "early", "final"


def detection_cache() -> Path:
    return cache.cache_root() / "detection"


# ---------------------------------------------------------------------------------------------
# The pool


@dataclass
class Pool:
    """The labelled pool: ``labels`` are the training labels (noise included), ``clean_labels`` the true
    ones, ``noisy[n]`` whether sample n's label was reassigned."""

    ids: list[str]
    inputs: Any  # [P, D] tensor or a list of token-id tuples
    labels: torch.Tensor
    clean_labels: torch.Tensor
    noisy: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.ids)

    def samples(self, rows: torch.Tensor | list[int]) -> LabeledSamples:
        """The rows as a detector sees them: ids, inputs and training labels only."""
        return LabeledSamples(self.ids, self.inputs, self.labels).subset(torch.as_tensor(rows).tolist())


def plant_label_noise(labels: torch.Tensor, num_classes: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels, mask): ``round(fraction · P)`` seeded samples get a label drawn uniformly from the
    *other* classes (so every planted label is wrong)."""
    gen = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    rows = torch.randperm(len(labels), generator=gen)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=gen)
    noisy = labels.clone()
    noisy[rows] = (labels[rows] + shift) % num_classes
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[rows] = True
    return noisy, mask


def memberships(n_models: int, pool_size: int, seed: int) -> torch.Tensor:
    """``[n_models, pool_size]`` bool: model i trains on a seeded random half (⌊P/2⌋ samples) of the pool."""
    out = torch.zeros(n_models, pool_size, dtype=torch.bool)
    for i in range(n_models):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out[i, torch.randperm(pool_size, generator=gen)[: pool_size // 2]] = True
    return out


# ---------------------------------------------------------------------------------------------
# What is trained


@dataclass(frozen=True)
class Train:
    """The optimisation recipe shared by every model of a pool (AdamW, constant lr, shuffled mini-batches)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    checkpoints: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
    threads: int = 1  # torch threads while training (part of the recipe: it changes float reduction order)


class Setup:
    """What a pool trains: a frozen, picklable description (so a worker can rebuild it from its fields).

    Subclasses are frozen dataclasses defining ``make_pool()``, ``new_model(index)``, ``sample_losses(model, samples)`` (per-sample
    training loss with grad), ``save``/``load`` of weights and ``view(model)``.
    """

    seed: int
    n_models: int
    noise: float
    train: Train

    def spec(self) -> dict[str, Any]:
        """Everything that determines the models (hashed into each member's cache key)."""
        return {"setup": type(self).__name__, "format": POOL_FORMAT, **dataclasses.asdict(self)}

    def pool(self) -> Pool:
        """The labelled pool (built once per setup value and process)."""
        return _pool_of(self)

    def make_pool(self) -> Pool:
        raise NotImplementedError

    def new_model(self, index: int) -> torch.nn.Module:
        raise NotImplementedError

    def sample_losses(self, model: torch.nn.Module, samples: LabeledSamples) -> torch.Tensor:
        raise NotImplementedError

    def save(self, model: torch.nn.Module, path: Path) -> None:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)

    def load(self, path: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
        model = self.new_model(0)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval()

    def view(self, model: torch.nn.Module) -> ClassifierModel:
        raise NotImplementedError

    def membership(self) -> torch.Tensor:
        return memberships(self.n_models, len(self.pool()), self.seed)


@functools.lru_cache(maxsize=8)
def _pool_of(setup: Setup) -> Pool:
    return setup.make_pool()


def member_key(setup: Setup, index: int) -> str:
    return cache.cache_key({"detection_member": index, **setup.spec()})


def prediction_checkpoint(fractions: list[float], median_losses: list[float]) -> int:
    """Dentan et al. (v3) rule: with ``median_losses[0]`` the median training loss before training and
    ``median_losses[c]`` at checkpoint ``c`` (``fractions[c-1]`` of training), take the checkpoint whose
    loss drop (L0 − Lc)/L0 is closest to 95 %, minus one. Returns the index into ``fractions`` (0-based);
    a rule landing on the untrained model is moved to the first checkpoint."""
    l0 = median_losses[0]
    drops = [(l0 - lc) / l0 if l0 > 0 else 0.0 for lc in median_losses[1:]]
    closest = min(range(len(drops)), key=lambda c: (abs(drops[c] - 0.95), c))  # ties: the earlier one
    return max(closest - 1, 0)


@torch.no_grad()
def _median_loss(setup: Setup, model: torch.nn.Module, samples: LabeledSamples) -> float:
    model.eval()
    losses = torch.cat([setup.sample_losses(model, samples.subset(range(s, min(s + 256, len(samples)))))
                        for s in range(0, len(samples), 256)])
    model.train()
    return float(losses.median())


def _train_into(setup: Setup, index: int, out: Path) -> None:
    """Train model ``index`` on its half of the pool; save the prediction checkpoint and the final model."""
    from memeval.organisms.train import deterministic_cpu

    rec = setup.train
    pool = setup.pool()
    rows = setup.membership()[index].nonzero().flatten()
    samples = pool.samples(rows)
    with deterministic_cpu(rec.threads):
        torch.manual_seed(setup.seed * 7919 + index)
        model = setup.new_model(index).train()
        gen = torch.Generator().manual_seed(setup.seed * 104_729 + index)
        per_epoch = math.ceil(len(samples) / rec.batch_size)
        total = rec.epochs * per_epoch
        ckpt_steps = [max(1, round(f * total)) for f in rec.checkpoints]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rec.lr,
                                weight_decay=rec.weight_decay)
        medians = [_median_loss(setup, model, samples)]
        kept: list[dict[str, torch.Tensor]] = []
        step, t0 = 0, time.perf_counter()
        for _ in range(rec.epochs):
            order = torch.randperm(len(samples), generator=gen)
            for start in range(0, len(samples), rec.batch_size):
                batch = samples.subset(order[start : start + rec.batch_size].tolist())
                loss = setup.sample_losses(model, batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                while len(kept) < len(ckpt_steps) and step == ckpt_steps[len(kept)]:
                    kept.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                    medians.append(_median_loss(setup, model, samples))
        final_median = _median_loss(setup, model, samples)
    chosen = prediction_checkpoint(list(rec.checkpoints), medians)
    early = setup.new_model(index)
    early.load_state_dict(kept[chosen])
    setup.save(early, out / f"{EARLY}.pt")
    setup.save(model, out / f"{FINAL}.pt")
    info = {"index": index, "members": int(len(rows)), "steps": total, "checkpoints": list(rec.checkpoints),
            "median_loss": {"initial": medians[0], "checkpoints": medians[1:], "final": final_median},
            "prediction_checkpoint": chosen, "prediction_fraction": rec.checkpoints[chosen],
            "seconds": round(time.perf_counter() - t0, 2), "spec": setup.spec()}
    (out / "member.json").write_text(json.dumps(info, indent=1))


def train_member(setup: Setup, index: int) -> Path:
    """The cache directory of pool model ``index`` (``early.pt``, ``final.pt``, ``member.json``), trained
    first unless a complete entry exists. Safe to call from several processes or machines sharing the cache."""
    if not 0 <= index < setup.n_models:
        raise ValueError(f"model index {index} outside 0..{setup.n_models - 1}")
    return cache.build_atomically(member_key(setup, index), lambda tmp: _train_into(setup, index, tmp),
                                  root=detection_cache())


def member_info(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "member.json").read_text())


def train_pool(setup: Setup, progress: bool = True) -> list[Path]:
    """Every model of the pool (cached ones are reused), with a progress bar on stderr."""
    done = [cache.is_complete(cache.entry_dir(member_key(setup, i), detection_cache())) for i in range(setup.n_models)]
    paths: list[Path] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task(f"training {type(setup).__name__} models ({sum(done)} cached)", total=setup.n_models,
                            completed=sum(done))
        for i in range(setup.n_models):
            paths.append(train_member(setup, i))
            if not done[i]:
                bar.advance(task)
    return paths
