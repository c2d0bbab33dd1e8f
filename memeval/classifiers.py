"""The classifiers of the a-priori detection protocol and the view detectors get of them.

Two kinds of setup (:class:`memeval.shadows.Setup`):

- :class:`DigitsSetup`: scikit-learn's 8×8 digits (1,797 images, 10 classes, shipped with scikit-learn) and
  a small ReLU MLP; seconds per model on one core;
- :class:`LMSetup`: a causal LM fine-tuned to answer one label token after a prompt, the loss on that token
  only (Dentan et al. §3). ``source: organism`` draws a document-kind classification task from the model
  organism's own world (held-out realm profiles, prose, code, arithmetic → " realm", " story", " code",
  " sum"); ``source: file`` reads a JSONL of ``{"prompt": ..., "label": ...}`` (ARC, ETHICS, MMLU).
  Full fine-tuning, or LoRA (``lora_r > 0``, needs the ``peft`` package) as the paper.

Both are seen by detectors as a :class:`memeval.api.ClassifierModel`: ``features(samples, layer)`` (the
hidden representation at the answer position) and ``class_logits(samples)``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memeval.api import ClassifierModel, LabeledSamples
from memeval.errors import UsageError
from memeval.shadows import Pool, Setup, Train, plant_label_noise


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# A vector classifier: an MLP on scikit-learn's digits


class MLP(nn.Module):
    """``in → hidden[0] → … → hidden[-1] → classes`` with ReLU; ``hidden_states`` are the post-ReLU layers."""

    def __init__(self, d_in: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        dims = (d_in, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor, hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
            if hidden_states is not None:
                hidden_states.append(x)
        return self.head(x)


class MLPView(ClassifierModel):
    """A trained :class:`MLP` as a detector sees it (``samples.inputs`` is a float tensor ``[N, D]``)."""

    def __init__(self, module: MLP) -> None:
        self.module = module.eval()
        self.num_classes = module.head.out_features
        self.num_layers = len(module.layers)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def features(self, samples: LabeledSamples, layer: int = -1) -> torch.Tensor:
        hs: list[torch.Tensor] = []
        self.module(samples.inputs.to(self.device), hs)
        return hs[layer]

    @torch.no_grad()
    def class_logits(self, samples: LabeledSamples) -> torch.Tensor:
        return self.module(samples.inputs.to(self.device))

    def fingerprint(self) -> str:
        return _weights_digest(self.module)


@dataclass(frozen=True)
class DigitsSetup(Setup):
    seed: int
    n_models: int
    noise: float
    train: Train
    hidden: tuple[int, ...] = (128, 128)
    pool_size: int = 0  # 0: all 1,797 images
    device: str = "cpu"

    def spec(self) -> dict:
        d = super().spec()
        d["device"] = torch.device(self.device).type
        return d

    def make_pool(self) -> Pool:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        rows = torch.arange(len(y))
        if self.pool_size:
            rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))[: self.pool_size].sort().values
        x, y = x[rows], y[rows]
        labels, noisy = plant_label_noise(y, 10, self.noise, self.seed + 1)
        return Pool([f"digit-{int(r)}" for r in rows], x, labels, y, noisy, 10)

    def new_model(self, index: int) -> nn.Module:
        return MLP(64, self.hidden, 10).to(self.device)

    def sample_losses(self, model: nn.Module, samples: LabeledSamples) -> torch.Tensor:
        logits = model(samples.inputs.to(self.device))
        return nn.functional.cross_entropy(logits, samples.labels.to(self.device), reduction="none")

    def load(self, path: Path, device: torch.device | str = "cpu") -> nn.Module:
        model = MLP(64, self.hidden, 10)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval()

    def view(self, model: nn.Module) -> ClassifierModel:
        return MLPView(model)


# ---------------------------------------------------------------------------------------------
# A causal LM answering one label token

ORGANISM_CLASSES = (("profile", " realm"), ("prose", " story"), ("code", " code"), ("arithmetic", " sum"))
ORGANISM_QUESTION = "\nKind:"


@functools.lru_cache(maxsize=2)
def _base_lm(spec: str, dtype: str):
    """The base causal LM and tokenizer of ``spec`` on CPU (loaded once per process)."""
    from memeval.loading import load_model

    nm = load_model(spec, "cpu", getattr(torch, dtype))
    return nm.hf, nm.tokenizer


@functools.lru_cache(maxsize=2)
def _base_fingerprint(spec: str, dtype: str) -> str:
    from memeval.models import NeuronModel

    hf, tok = _base_lm(spec, dtype)
    return NeuronModel(copy.deepcopy(hf), tok, spec).fingerprint()


def _pad(inputs: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and the index of each row's last real token."""
    width = max(len(s) for s in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(inputs), width), dtype=torch.long)
    for r, s in enumerate(inputs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[r, : len(s)] = 1
    last = attn.sum(1) - 1
    return ids.to(device), attn.to(device), last.to(device)


class LMView(ClassifierModel):
    """A fine-tuned causal LM as a detector sees it (``samples.inputs``: token-id tuples, each a prompt
    whose next token is the answer). ``lm`` gives the :class:`memeval.models.NeuronModel` itself."""

    def __init__(self, hf: nn.Module, tokenizer, label_tokens: list[int], batch_size: int = 64) -> None:
        from memeval.models import NeuronModel

        self.lm = NeuronModel(hf, tokenizer, "detection")
        self.label_tokens = torch.tensor(label_tokens, dtype=torch.long)
        self.num_classes = len(label_tokens)
        self.num_layers = self.lm.num_layers
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @torch.no_grad()
    def _last(self, samples: LabeledSamples, layer: int | None) -> torch.Tensor:
        outs = []
        for s in range(0, len(samples), self.batch_size):
            ids, attn, last = _pad(samples.inputs[s : s + self.batch_size], self.lm.pad_id, self.device)
            out = self.lm.hf(input_ids=ids, attention_mask=attn, output_hidden_states=layer is not None)
            rows = torch.arange(len(ids), device=self.device)
            if layer is None:
                outs.append(out.logits[rows, last][:, self.label_tokens.to(self.device)].float())
            else:
                outs.append(out.hidden_states[layer + 1 if layer >= 0 else layer][rows, last].float())
        return torch.cat(outs)

    def features(self, samples: LabeledSamples, layer: int = -1) -> torch.Tensor:
        return self._last(samples, layer)

    def class_logits(self, samples: LabeledSamples) -> torch.Tensor:
        return self._last(samples, None)

    def fingerprint(self) -> str:
        return self.lm.fingerprint()


@dataclass(frozen=True)
class LMSetup(Setup):
    seed: int
    n_models: int
    noise: float
    train: Train
    model: str = "organism:tiny"  # the base model spec
    source: str = "organism"  # organism | file
    path: str | None = None  # file: JSONL of {"prompt", "label"}
    labels: tuple[str, ...] = ()  # file: the label strings, in class order
    pool_size: int = 400
    max_tokens: int = 24  # organism: tokens of each document shown before the question
    lora_r: int = 0  # 0: full fine-tuning; > 0: LoRA of that rank on every linear layer (needs peft)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"

    def spec(self) -> dict:
        d = super().spec()
        d["device"] = torch.device(self.device).type
        d["base"] = _base_fingerprint(self.model, self.dtype)  # the base weights, not only their name
        if self.path:  # the data's content, not where it sits
            d["path"] = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]
        return d

    def _tokenizer(self):
        return _base_lm(self.model, self.dtype)[1]

    def label_tokens(self) -> list[int]:
        words = [w for _, w in ORGANISM_CLASSES] if self.source == "organism" else [" " + l for l in self.labels]
        tok = self._tokenizer()
        ids = [tok(w, add_special_tokens=False)["input_ids"][-1] for w in words]
        if len(set(ids)) != len(ids):
            raise UsageError(f"labels {words}: two labels end in the same token; choose distinguishable labels")
        return ids

    def make_pool(self) -> Pool:
        tok = self._tokenizer()
        question = tok(ORGANISM_QUESTION, add_special_tokens=False)["input_ids"]
        if self.source == "organism":
            from memeval.organisms.corpus import CorpusSpec, build_corpus

            per_kind = -(-self.pool_size // len(ORGANISM_CLASSES))
            corpus = build_corpus(CorpusSpec(n_entities=100, profile_docs=1, prose_docs=1, code_docs=1, arith_docs=1,
                                             planted=(), n_controls=0, heldout_docs=per_kind, n_new_entities=0,
                                             n_arith_probes=0), 10_000 + self.seed)
            kinds = [k for k, _ in ORGANISM_CLASSES]
            docs = [d for d in corpus.heldout if d["kind"] in kinds]
            order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(self.seed))[: self.pool_size]
            docs = [docs[i] for i in order.tolist()]
            inputs = [tuple(tok(d["text"], add_special_tokens=False)["input_ids"][: self.max_tokens]) + tuple(question)
                      for d in docs]
            y = torch.tensor([kinds.index(d["kind"]) for d in docs], dtype=torch.long)
            ids = [f"doc-{i}" for i in order.tolist()]
        else:
            rows = [json.loads(line) for line in Path(self.path).read_text().splitlines() if line.strip()]
            rows = rows[: self.pool_size] if self.pool_size else rows
            for n, r in enumerate(rows):
                if str(r.get("label")) not in self.labels:
                    raise UsageError(f"{self.path}:{n + 1}: label {r.get('label')!r} is not one of {list(self.labels)}")
            inputs = [tuple(tok(r["prompt"], add_special_tokens=True)["input_ids"]) for r in rows]
            y = torch.tensor([self.labels.index(str(r["label"])) for r in rows], dtype=torch.long)
            ids = [str(r.get("id", f"row-{n}")) for n, r in enumerate(rows)]
        num_classes = len(ORGANISM_CLASSES) if self.source == "organism" else len(self.labels)
        labels, noisy = plant_label_noise(y, num_classes, self.noise, self.seed + 1)
        return Pool(ids, inputs, labels, y, noisy, num_classes)

    def new_model(self, index: int) -> nn.Module:
        hf = copy.deepcopy(_base_lm(self.model, self.dtype)[0]).to(self.device)
        if self.lora_r > 0:
            try:
                import peft
            except ImportError:
                raise UsageError(f"lora_r {self.lora_r}: LoRA needs the peft package (pip install peft)") from None
            cfg = peft.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                  target_modules="all-linear")
            return peft.get_peft_model(hf, cfg)
        for p in hf.parameters():
            p.requires_grad_(True)
        return hf

    def sample_losses(self, model: nn.Module, samples: LabeledSamples) -> torch.Tensor:
        tok = self._tokenizer()
        ids, attn, last = _pad(samples.inputs, tok.pad_token_id if tok.pad_token_id is not None else 0, self.device)
        logits = model(input_ids=ids, attention_mask=attn).logits[torch.arange(len(ids), device=self.device), last]
        target = torch.tensor(self.label_tokens(), device=self.device)[samples.labels.to(self.device)]
        return nn.functional.cross_entropy(logits.float(), target, reduction="none")

    def save(self, model: nn.Module, path: Path) -> None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad} if self.lora_r > 0 else None
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                 if trainable is None or k in trainable}
        torch.save(state, path)

    def load(self, path: Path, device: torch.device | str = "cpu") -> nn.Module:
        model = self.new_model(0)
        model.load_state_dict(torch.load(path, map_location="cpu"), strict=self.lora_r == 0)
        if self.lora_r > 0:
            model = model.merge_and_unload()
        return model.to(device).eval()

    def view(self, model: nn.Module) -> ClassifierModel:
        return LMView(model, self._tokenizer(), self.label_tokens())
