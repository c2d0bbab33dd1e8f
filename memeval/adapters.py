"""Adapters between method kinds (DESIGN §3).

:func:`localize_then_ablate` turns any :class:`~memeval.api.Localizer` into a set-level
:class:`~memeval.api.Editor`: attribute every neuron on each sequence of the forget set, average the scores
over the set, and zero the top ``budget`` fraction of neurons of every scored layer (layers ≥ 1 by default,
as MemPi's DEL) by zeroing their down-projection columns in a copy of the model. Nothing here is specific
to one method, so every localizer appears in the editing tasks.
"""

from __future__ import annotations

from typing import Any

import torch

from memeval.api import Editor, Localizer, SequenceSet
from memeval.errors import UsageError


def neurons_per_layer(num_neurons: int, budget: float) -> int:
    """``int(I · budget)`` neurons (DEL's rule), at least 1 for a positive budget, at most I."""
    if budget <= 0:
        return 0
    return min(num_neurons, max(1, int(num_neurons * budget)))


class LocalizeThenAblate(Editor):
    """Editor view of a localizer: mean attribution over the forget set, zero the top-k per layer."""

    kind = "editor"

    def __init__(self, localizer: Localizer, skip_layers: tuple[int, ...] | list[int] = (0,),
                 batch_size: int = 16) -> None:
        super().__init__(localizer.config)
        self.localizer = localizer
        self.skip_layers = tuple(skip_layers)
        self.batch_size = batch_size
        self.name = localizer.name
        self.summary = f"{localizer.name}, then zero the top neurons (localize_then_ablate)"
        self.paper = localizer.paper
        self._cache: dict[Any, torch.Tensor] = {}

    def scores(self, model, forget: SequenceSet) -> torch.Tensor:
        """Mean attribution ``[L, I]`` over the forget set (rows weighted equally).

        Memoised per (model, forget set): a budget sweep localizes once.
        """
        key = (id(model), tuple(s.id for s in forget.sequences), tuple(s.input_ids for s in forget.sequences))
        if key in self._cache:
            return self._cache[key]
        total, rows = None, 0
        for batch in forget.batches(self.batch_size, model.device):
            s = self.localizer.localize(model, batch)
            expected = (len(batch), model.num_layers, model.num_neurons)
            if tuple(s.shape) != expected:
                raise RuntimeError(f"localize returned shape {tuple(s.shape)}, expected {expected}")
            if not torch.isfinite(s).all():
                raise RuntimeError("localize returned non-finite scores")
            part = s.detach().float().sum(0)
            total = part if total is None else total + part
            rows += len(batch)
        mean = total / rows
        self._cache = {key: mean}  # keep only the latest set
        return mean

    def edit(self, model, forget: SequenceSet | None, retain: SequenceSet | None, budget: float):
        if forget is None or len(forget) == 0:
            raise UsageError(f"{self.name}: localize_then_ablate needs a forget set")
        scores = self.scores(model, forget)
        k = neurons_per_layer(model.num_neurons, budget)
        skip = {l % model.num_layers for l in self.skip_layers}
        edited = model.clone()
        if k == 0:
            return edited
        for layer in range(model.num_layers):
            if layer in skip:
                continue
            idx = scores[layer].topk(k).indices
            w = edited.down_proj(layer).detach().clone()
            w[:, idx.to(w.device)] = 0
            edited.set_down_proj(layer, w)
        return edited


def localize_then_ablate(localizer: Localizer, skip_layers: tuple[int, ...] | list[int] = (0,),
                         batch_size: int = 16) -> LocalizeThenAblate:
    """Any localizer as a set-level editor (see the module docstring)."""
    return LocalizeThenAblate(localizer, skip_layers, batch_size)


def as_editor(method, skip_layers=(0,), batch_size: int = 16) -> Editor:
    """``method`` itself if it is an editor, else :func:`localize_then_ablate` of the localizer."""
    if isinstance(method, Editor):
        return method
    if isinstance(method, Localizer):
        return localize_then_ablate(method, skip_layers, batch_size)
    raise UsageError(f"method '{getattr(method, 'name', method)}' ({method.kind}) is neither an editor nor a localizer")
