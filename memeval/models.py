"""The neuron view of any Hugging Face causal LM (DESIGN §3); loading a model from a spec is memeval.loading.

A *neuron* is one input coordinate of a layer's MLP down-projection (GPT-2 ``mlp.c_proj``, GPT-NeoX
``mlp.dense_4h_to_h``, Llama/OLMo-2/Qwen2/Gemma/Phi-3 ``mlp.down_proj``, OPT ``fc2``), so gated MLPs work
unchanged: what is seen is the vector that the down-projection mixes back into the residual stream
(Chang et al. 2024 §2, Geva et al. 2022). The down-projections are found by module structure; the
number of neurons is read off the module's weight, never assumed to be ``4 × hidden``.

Attention "neurons" (for editors that prune them, e.g. Selective Pruning) are the input coordinates of each
block's attention output projection (GPT-2 ``attn.c_proj``, GPT-NeoX ``attention.dense``, Llama/OLMo-2/
Qwen2/Gemma/Phi-3 ``self_attn.o_proj``, OPT ``self_attn.out_proj``): the concatenated per-head values before W_O.
They are found on first use, so a model without a recognisable one fails only when they are asked for.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
from typing import Callable, Iterator

import torch
from torch import nn

from memeval.api import Batch
from memeval.errors import UsageError
from memeval.metrics import masked_mean, token_nll

InterventionFn = Callable[[torch.Tensor], torch.Tensor]

# Known names of the MLP down-projection inside a decoder block, tried before the structural rule.
DOWN_PROJ_NAMES = ("mlp.c_proj", "mlp.dense_4h_to_h", "mlp.down_proj", "fc2", "mlp.fc2", "feed_forward.w2")
# Known names of the attention output projection (W_O) inside a decoder block.
ATTN_OUT_NAMES = ("attn.c_proj", "attention.dense", "self_attn.o_proj", "self_attn.out_proj", "attn.out_proj",
                  "self_attention.dense", "self_attn.dense")



def _conv1d_or_linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or of GPT-2's transposed Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2:
        return module.weight.shape[0], module.weight.shape[1]
    return None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as ``[out, in]`` (a view)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite the weight of a Linear or Conv1D with ``weight`` given as ``[out, in]``."""
    with torch.no_grad():
        module.weight.copy_(weight if isinstance(module, nn.Linear) else weight.T)


def find_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder blocks: the largest ModuleList of ``num_layers`` modules that have parameters."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    candidates = [m for m in candidates if all(any(True for _ in b.parameters()) for b in m)]
    if not candidates:
        raise UsageError(f"{type(model).__name__}: no list of {num_layers} decoder blocks found")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def find_down_proj(block: nn.Module, hidden_size: int) -> nn.Module:
    """The MLP down-projection of one block: a known name, else the unique layer mapping a width other
    than ``hidden_size`` back to ``hidden_size``."""
    named = dict(block.named_modules())
    for name in DOWN_PROJ_NAMES:
        if name in named and _conv1d_or_linear_dims(named[name]) is not None:
            return named[name]
    found = [m for m in named.values()
             if (dims := _conv1d_or_linear_dims(m)) is not None and dims[1] == hidden_size and dims[0] != hidden_size]
    if len(found) != 1:
        raise UsageError(f"{type(block).__name__}: cannot identify the MLP down-projection ({len(found)} candidates)")
    return found[0]


def find_attn_out_proj(block: nn.Module, hidden_size: int) -> nn.Module:
    """The attention output projection of one block: a known name, else the last layer mapping to
    ``hidden_size`` inside a child module named like ``attn``/``attention`` (registered after Q, K, V)."""
    named = dict(block.named_modules())
    for name in ATTN_OUT_NAMES:
        if name in named and _conv1d_or_linear_dims(named[name]) is not None:
            return named[name]
    found = [m for name, m in named.items() if "att" in name.partition(".")[0]
             and (dims := _conv1d_or_linear_dims(m)) is not None and dims[1] == hidden_size]
    if not found:
        raise UsageError(f"{type(block).__name__}: cannot identify the attention output projection "
                         f"(none of {', '.join(ATTN_OUT_NAMES)})")
    return found[-1]


def cache_kwarg(hf_model: nn.Module) -> str:
    """The forward keyword that takes a KV cache: ``cache`` in transformers >= 5.24, ``past_key_values`` before
    (passing the old name to a new version prints a deprecation warning on every call)."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned (``output.cache`` in recent transformers, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _remember_batch_shape(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the whole model: store [B, T] of the current input on the module."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    module._memeval_bt = tuple(ids.shape[:2]) if ids is not None else None


class NeuronModel:
    """A causal LM seen as ``num_layers`` layers of ``num_neurons`` MLP neurons.

    All interventions go through :meth:`intervene`, which replaces the input of chosen layers'
    down-projections; masking, scaling, zero-ablation, patching and capture are built on it.
    """

    def __init__(self, hf_model: nn.Module, tokenizer, spec: str = "") -> None:
        self.hf = hf_model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        cfg = hf_model.config
        self.num_layers: int = cfg.num_hidden_layers
        self.hidden_size: int = cfg.hidden_size
        self.blocks = find_blocks(hf_model, self.num_layers)
        self.down_projs: list[nn.Module] = [find_down_proj(b, self.hidden_size) for b in self.blocks]
        widths = {_conv1d_or_linear_dims(m)[0] for m in self.down_projs}
        if len(widths) != 1:
            raise UsageError(f"{spec}: MLP widths differ across layers ({sorted(widths)}); not supported")
        self.num_neurons: int = widths.pop()
        # Some architectures (OPT) flatten [B, T, H] to [B*T, H] inside the MLP; remember [B, T] of the
        # current forward so interventions always see [B, T, I].
        if not getattr(self.hf, "_memeval_shape_hook", False):
            self.hf.register_forward_pre_hook(_remember_batch_shape, with_kwargs=True)
            self.hf._memeval_shape_hook = True

    # -- basic properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if cand is not None:
                return int(cand)
        return 0

    def down_proj(self, layer: int, row: int | None = None) -> torch.Tensor:
        """The down-projection weight of ``layer`` as ``[d_model, num_neurons]`` (column i = neuron i), as batch
        row ``row`` sees it: every row shares it here; a batched INJ model (memeval.batched) has one per row."""
        return weight_out_in(self.down_projs[layer])

    @contextlib.contextmanager
    def rows(self, index) -> Iterator[None]:
        """Forwards inside compute, in their row j, batch row ``index[j]`` (a subset, repeats or reordering of
        the batch given to the method; one index broadcasts). Nothing to do when all rows share the weights."""
        yield

    def set_down_proj(self, layer: int, weight: torch.Tensor) -> None:
        """Overwrite the down-projection of ``layer`` with ``weight`` given as ``[d_model, num_neurons]``."""
        set_weight_out_in(self.down_projs[layer], weight)

    # -- attention neurons (found on first use) -------------------------------------------------
    @functools.cached_property
    def attn_out_projs(self) -> list[nn.Module]:
        """The attention output projection (W_O) of every block; a UsageError if one cannot be found."""
        return [find_attn_out_proj(b, self.hidden_size) for b in self.blocks]

    @property
    def attn_width(self) -> int:
        """The number of attention neurons per layer: the input width of W_O (heads × head_dim)."""
        widths = {_conv1d_or_linear_dims(m)[0] for m in self.attn_out_projs}
        if len(widths) != 1:
            raise UsageError(f"{self.spec}: attention widths differ across layers ({sorted(widths)}); not supported")
        return widths.pop()

    def attn_out_proj(self, layer: int) -> torch.Tensor:
        """W_O of ``layer`` as ``[d_model, attn_width]`` (column j = attention neuron j)."""
        return weight_out_in(self.attn_out_projs[layer])

    def set_attn_out_proj(self, layer: int, weight: torch.Tensor) -> None:
        """Overwrite W_O of ``layer`` with ``weight`` given as ``[d_model, attn_width]``."""
        set_weight_out_in(self.attn_out_projs[layer], weight)

    # -- the one intervention primitive ---------------------------------------------------------
    @contextlib.contextmanager
    def intervene(self, fns: dict[int, InterventionFn], attention: bool = False) -> Iterator[None]:
        """Within the block, layer ``l``'s down-projection receives ``fns[l](h)`` instead of ``h [B, T, I]``;
        with ``attention``, its attention output projection (``h [B, T, attn_width]``) instead."""
        modules = self.attn_out_projs if attention else self.down_projs
        handles = []

        def make_hook(fn: InterventionFn):
            def hook(_module, args):
                h = args[0]
                bt = getattr(self.hf, "_memeval_bt", None)
                if h.dim() == 2 and bt is not None:  # flattened tokens (OPT)
                    return (fn(h.reshape(*bt, h.shape[-1])).reshape(h.shape),) + tuple(args[1:])
                return (fn(h),) + tuple(args[1:])

            return hook

        try:
            for layer, fn in fns.items():
                handles.append(modules[layer].register_forward_pre_hook(make_hook(fn)))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def capture(self, layers: list[int] | None = None, attention: bool = False) -> Iterator[dict[int, torch.Tensor]]:
        """Record the neuron activations ``[B, T, I]`` of ``layers`` (all by default) during the block
        (with ``attention``, the attention neurons ``[B, T, attn_width]``)."""
        store: dict[int, torch.Tensor] = {}

        def keep(layer: int) -> InterventionFn:
            def fn(h: torch.Tensor) -> torch.Tensor:
                store[layer] = h
                return h

            return fn

        with self.intervene({l: keep(l) for l in (range(self.num_layers) if layers is None else layers)}, attention):
            yield store

    @contextlib.contextmanager
    def ablate(self, neurons: dict[int, torch.Tensor], attention: bool = False) -> Iterator[None]:
        """Zero the given neuron indices of each layer (the same for every row); attention neurons with
        ``attention``."""

        def zero(idx: torch.Tensor) -> InterventionFn:
            def fn(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[..., idx] = 0
                return h

            return fn

        with self.intervene({l: zero(idx.to(self.device)) for l, idx in neurons.items() if len(idx)}, attention):
            yield

    # -- outputs --------------------------------------------------------------------------------
    def logits(self, batch: Batch) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` (right padding: padded positions never affect real ones)."""
        return self.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def sequence_nll(self, batch: Batch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row mean next-token NLL (nats) over the tokens where ``batch.loss_mask`` is True: ``[B]``."""
        logits = self.logits(batch) if logits is None else logits
        return masked_mean(token_nll(logits, batch.input_ids), batch.loss_mask)

    # -- identity and copies --------------------------------------------------------------------
    @torch.no_grad()
    def fingerprint(self) -> str:
        """A cheap digest of every weight: per tensor its sum, sum of squares and row/column-weighted sums.

        Any in-place change to a weight (a zeroed column, a swapped row, a scaled tensor) changes it.
        One read of each tensor; the reductions stay on the model's device until a single transfer.
        """
        parts = []
        for name, p in self.hf.named_parameters():
            v = p.detach().float().reshape(p.shape[0] if p.dim() else 1, -1)
            rows = torch.arange(1, v.shape[0] + 1, device=v.device, dtype=torch.float32)
            cols = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=torch.float32)
            parts.append(torch.stack([v.sum(), (v * v).sum(), (v.sum(1) * rows).sum(), (v.sum(0) * cols).sum()]))
        digest = torch.stack(parts).double().cpu().numpy().tobytes()
        names = ",".join(f"{n}:{tuple(p.shape)}" for n, p in self.hf.named_parameters()).encode()
        return hashlib.sha256(names + digest).hexdigest()[:16]

    def clone(self) -> "NeuronModel":
        """A deep copy (for editors, which must return a new model and leave theirs untouched)."""
        return NeuronModel(copy.deepcopy(self.hf), self.tokenizer, self.spec)
