"""A testing kit for plugin authors (loaded by pytest through the ``pytest11`` entry point).

- ``memeval_plugin`` fixture: ``memeval_plugin(obj, name)`` registers a plugin (a module or any object
  with hook implementations) for one test and unregisters it afterwards, even if the test fails.
- :func:`build_tiny_model`: a tiny random causal LM of a given architecture, with a tokenizer, saved as a
  local transformers directory (no hub access).
- :class:`ToyProtocol` (``toy``) and :class:`ToyLocalizer` (``toy_oracle``): a CPU-only task kind and
  method for exercising the runner. The toy ground truth of an item is the set of neurons with the
  largest mean |activation| over its suffix; ``toy_oracle`` returns exactly that statistic, so its
  ``recall`` is 1.0, while ``random`` scores about ``k``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer, Method, TokenSequence
from memeval.protocols import Protocol

ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "olmo2", "qwen2", "opt", "gemma", "phi3")


@pytest.fixture
def memeval_plugin() -> Iterator:
    """Register plugins for the duration of one test: ``memeval_plugin(module_or_obj, "name")``.

    A plugin that is already registered (a package installed with its entry point) is left as it is, so the
    same test runs before and after ``pip install``."""
    from memeval import plugins

    names: list[str] = []

    def register(obj: object, name: str) -> object:
        if plugins.get_plugin_manager().is_registered(obj):
            return obj
        plugins.register(obj, name)
        names.append(name)
        return obj

    try:
        yield register
    finally:
        for name in names:
            plugins.unregister(name)


# ---------------------------------------------------------------------------------------------
# Tiny random models


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "north", "seven", "quiet", "lamp"]
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, intermediate: int = 80):
    """A transformers config of the given architecture with tiny sizes (the MLP width is not 4×hidden)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, num_attention_heads=4, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, n_inner=intermediate, n_positions=128,
                             vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                                max_position_embeddings=128, bos_token_id=0, eos_token_id=0, **common)
    if arch == "opt":
        return tf.OPTConfig(num_hidden_layers=layers, hidden_size=hidden, ffn_dim=intermediate, word_embed_proj_dim=hidden,
                            max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
    llama_like = {"llama": tf.LlamaConfig, "olmo2": tf.Olmo2Config, "qwen2": tf.Qwen2Config, "gemma": tf.GemmaConfig,
                  "phi3": tf.Phi3Config}  # phi3: a fused gate/up projection (mlp.gate_up_proj, hidden → 2·I)
    if arch in llama_like:
        extra = {"head_dim": hidden // 4} if arch == "gemma" else {}
        return llama_like[arch](num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                                pad_token_id=0, **extra, **common)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def build_tiny_model(arch: str, path: Path, seed: int = 0, vocab_size: int = 128, **sizes) -> Path:
    """Save a seeded tiny random model of ``arch`` and its tokenizer to ``path`` (if not already there)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tokenizer = _tiny_tokenizer(vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **sizes))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_memorized_jsonl(path: Path, n: int, generator: torch.Generator, length: int = 14, prefix_len: int = 6,
                          vocab_size: int = 120) -> list[TokenSequence]:
    """Write ``n`` random token sequences as a memorized-sequence file (one ``{"input_ids", "prefix_len"}`` JSON
    object per line, the format of ``data.path`` in deletion/specificity tasks) and return them (ids m0, m1, …)."""
    seqs = [TokenSequence(f"m{i}", tuple(torch.randint(1, vocab_size, (length,), generator=generator).tolist()),
                          prefix_len) for i in range(n)]
    path.write_text("".join(json.dumps({"input_ids": list(s.input_ids), "prefix_len": prefix_len}) + "\n"
                            for s in seqs))
    return seqs


# ---------------------------------------------------------------------------------------------
# A toy protocol and method


def suffix_activation(model, batch: Batch) -> torch.Tensor:
    """Mean |activation| of every neuron over each row's suffix-predicting positions: ``[B, L, I]``."""
    with torch.no_grad(), model.capture() as acts:
        model.logits(batch)
    predicting = torch.roll(batch.loss_mask, shifts=-1, dims=1).float()  # position t-1 predicts token t
    stacked = torch.stack([acts[l].abs().float() for l in range(model.num_layers)], dim=1)  # [B, L, T, I]
    return (stacked * predicting[:, None, :, None]).sum(2) / predicting.sum(1)[:, None, None]


class ToyProtocol(Protocol):
    """Recall of the top-k% neurons against the oracle set of each random token sequence."""

    name = "toy"
    summary = "Recall of a localizer's top-k neurons against the most active suffix neurons (testing only)"
    accepts = ("localizer",)

    @dataclass
    class Data:
        sequences: int = 6
        length: int = 12
        prefix: int = 4

    @dataclass
    class Params:
        k: float = 0.1

    def prepare(self) -> None:
        rng = random.Random(self.seed)
        vocab = len(self.model.tokenizer)
        self.sequences = {
            f"seq{i}": TokenSequence(f"seq{i}", tuple(rng.randrange(1, vocab) for _ in range(self.data.length)),
                                     self.data.prefix)
            for i in range(self.data.sequences)
        }

    def items(self) -> list[str]:
        return list(self.sequences)

    def metrics(self) -> dict[str, bool]:
        return {"recall": True, "top_score": True}

    def primary_metric(self) -> str:
        return "recall"

    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, float]]:
        batch = Batch.from_sequences([self.sequences[i] for i in item_ids], self.model.pad_id, self.model.device)
        scores = method.localize(self.model, batch)
        truth = suffix_activation(self.model, batch)
        k = max(1, math.floor(self.params.k * self.model.num_neurons))
        pred = scores.topk(k, dim=-1).indices
        gold = truth.topk(k, dim=-1).indices
        out = []
        for row in range(len(item_ids)):
            hits = sum(len(set(pred[row, l].tolist()) & set(gold[row, l].tolist())) for l in range(self.model.num_layers))
            out.append({"recall": hits / (k * self.model.num_layers), "top_score": float(scores[row].max())})
        return out


class ToyLocalizer(Localizer):
    """Returns the toy ground-truth statistic; ``mode`` makes it misbehave for runner tests."""

    name = "toy_oracle"
    summary = "Oracle for the toy protocol (testing only)"
    paper = "-"

    @dataclass
    class Config(Localizer.Config):
        mode: str = "oracle"  # oracle | raise | nan | modify | raise_on:<item id>
        scale: float = 1.0

    def localize(self, model, batch: Batch) -> torch.Tensor:
        mode = self.config.mode
        if mode == "raise" or (mode.startswith("raise_on:") and mode.split(":", 1)[1] in batch.item_ids):
            raise RuntimeError("toy failure")
        if mode == "modify":
            with torch.no_grad():
                model.down_proj(0)[:, 0] += 1.0
        scores = suffix_activation(model, batch) * self.config.scale
        if mode == "nan":
            scores[:] = float("nan")
        return scores


class ToyPlugin:
    """Register with ``memeval_plugin(ToyPlugin(), "toy")``."""

    @hookimpl
    def memeval_protocols(self):
        return [ToyProtocol]

    @hookimpl
    def memeval_methods(self):
        return [ToyLocalizer]
