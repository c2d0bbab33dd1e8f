"""B models that differ only in some down-projection columns, presented as one batched :class:`NeuronModel`.

INJ gives every item its own injected model: the base weights with a few down-projection columns replaced.
:func:`row_weights` shows B such models as one: batch row b of every forward computes with the base weights
plus its own columns, applied inside the MLP as a per-row delta (a forward hook on each down-projection adds
``(new_b − old_b) · h_b[cols_b]``; ``h`` is the projection's input after any intervention, so zeroing or masking
a neuron removes its injected part too). A localizer that only runs and intervenes on the model then scores the
B items in one call.

Which forward row is which item: by default forward row j is batch row j. A method that forwards a subset, a
repetition or a reordering of its batch's rows says so with ``with model.rows(index):`` (``index[j]`` is the
batch row of forward row j; one index broadcasts to every forward row). A forward whose row count matches
neither is an error, never a silent mix-up. ``model.down_proj(layer, row=b)`` reads row b's weights.
A method declares that it follows these rules with ``per_row_weights = True`` (:class:`memeval.api.Localizer`);
INJ hands any other method one item at a time.

Equal to running each row's own model up to float rounding (``W h + Δ h[cols]`` instead of ``W' h``); inside
``model.rows([b])`` (one row) row b's columns are written into the weights for the block instead, so a method
that scores rows one at a time (Zero-Out) computes exactly the floats of batch 1.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from memeval.models import NeuronModel

# one item's injected columns: layer -> (column indices [w], new columns [d_model, w])
RowColumns = dict[int, tuple[torch.Tensor, torch.Tensor]]


class RowWeights(NeuronModel):
    """The base model's modules and weights (shared, never modified) with per-row down-projection columns."""

    def __init__(self, base: NeuronModel, rows: list[RowColumns]) -> None:
        self.__dict__.update(base.__dict__)  # hf, blocks, down_projs, ... shared with the base
        self.num_rows = len(rows)
        self._columns = rows
        self._map: torch.Tensor | None = None
        self._written: int | None = None  # the row whose columns are in the shared weights (model.rows([b]))
        self._handles: list = []
        dev, dt = base.device, base.dtype
        self._deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (idx [B, w], delta [B, d, w])
        for layer in range(self.num_layers):
            entries = [r.get(layer) for r in rows]
            width = max((len(e[0]) for e in entries if e is not None), default=0)
            if width == 0:
                continue
            old = base.down_proj(layer).detach()
            idx = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
            delta = torch.zeros(len(rows), self.hidden_size, width, dtype=dt, device=dev)  # padding adds 0
            for b, e in enumerate(entries):
                if e is not None and len(e[0]):
                    cols = e[0].to(dev)
                    idx[b, : len(cols)] = cols
                    delta[b, :, : len(cols)] = e[1].to(dev, dt) - old[:, cols]
            self._deltas[layer] = (idx, delta)

    # -- which batch row each forward row is ------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, index) -> Iterator[None]:
        """One row without autograd: its columns are written into the shared weights for the block (and restored
        after), so its forwards compute exactly as its own model's (Zero-Out's ablation variants of a row give the
        floats of batch 1); otherwise the per-row deltas (a backward after the block must see the same weights)."""
        if self._written is not None:
            raise RuntimeError("model.rows() inside model.rows() of a single row")
        previous = self._map
        self._map = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
        write = self._map.numel() == 1 and not torch.is_grad_enabled()
        saved = self._write(int(self._map)) if write else None
        try:
            yield
        finally:
            if saved is not None:
                self._restore(saved)
            self._map = previous

    @torch.no_grad()
    def _write(self, row: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        saved = {}
        for layer, (cols, new) in self._columns[row].items():
            if len(cols):
                w = super().down_proj(layer)  # a view of the parameter: only the columns are copied
                cols = cols.to(w.device)
                saved[layer] = (cols, w[:, cols].clone())
                w[:, cols] = new.to(w.device, w.dtype)
        self._written = row
        return saved

    @torch.no_grad()
    def _restore(self, saved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (cols, old) in saved.items():
            super().down_proj(layer)[:, cols] = old
        self._written = None

    def _forward_rows(self, n: int) -> torch.Tensor:
        if self._map is None:
            if n != self.num_rows:
                raise RuntimeError(f"a forward of {n} rows on a model holding {self.num_rows} rows' weights: "
                                   "name the batch row of each forward row with `with model.rows(index):`")
            return torch.arange(n, device=self.device)
        if self._map.numel() not in (1, n):
            raise RuntimeError(f"a forward of {n} rows inside model.rows() of {self._map.numel()} rows")
        return self._map

    # -- weights ------------------------------------------------------------------------------------
    def down_proj(self, layer: int, row: int | None = None) -> torch.Tensor:
        if row is None:
            if self._map is not None and self._map.numel() == 1:
                row = int(self._map)
            elif self.num_rows == 1:
                row = 0
            else:
                raise RuntimeError("the rows of this model have different down-projections: "
                                   "read them as model.down_proj(layer, row=b)")
        if self._written is not None and row != self._written:
            raise RuntimeError(f"row {self._written}'s weights are in place inside model.rows([{self._written}])")
        w = super().down_proj(layer)
        entry = self._columns[row].get(layer)
        if entry is None or not len(entry[0]) or self._written == row:
            return w
        w = w.detach().clone()
        w[:, entry[0].to(w.device)] = entry[1].to(w.device, w.dtype)
        return w

    def set_down_proj(self, layer: int, weight: torch.Tensor) -> None:
        raise RuntimeError("a batched INJ model is read-only")

    def clone(self) -> NeuronModel:
        raise RuntimeError("a batched INJ model cannot be copied (editors receive a plain model)")

    # -- the per-row deltas -------------------------------------------------------------------------
    def _hook(self, layer: int):
        idx, delta = self._deltas[layer]

        def hook(_module, args, output):
            if self._written is not None:  # the weights are that row's own already
                return output
            h = args[0]
            shape = output.shape
            if h.dim() == 2:  # flattened tokens (OPT)
                h = h.view(*self.hf._memeval_bt, h.shape[-1])
            n, t, _ = h.shape
            rows = self._forward_rows(n)
            if rows.numel() == 1:  # every forward row is the same batch row
                add = h[..., idx[rows[0]]] @ delta[rows[0]].T.to(h.dtype)
            else:
                sel = h.gather(-1, idx[rows][:, None, :].expand(n, t, -1))
                add = torch.bmm(sel, delta[rows].transpose(1, 2).to(h.dtype))
            return (output.view(n, t, -1) + add).view(shape)

        return hook

    def _attach(self) -> None:
        for layer in self._deltas:
            self._handles.append(self.down_projs[layer].register_forward_hook(self._hook(layer)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def row_weights(base: NeuronModel, rows: list[RowColumns]) -> Iterator[RowWeights]:
    """``base`` as B models, row b with the down-projection columns ``rows[b]`` (layer -> (cols, new)); the
    hooks are removed on exit. ``base``'s weights are never changed."""
    model = RowWeights(base, rows)
    model._attach()
    try:
        yield model
    finally:
        model._detach()
