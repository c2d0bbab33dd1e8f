"""Selective Pruning's optional attention-neuron pruning (the inputs of each block's attention output
projection W_O): a planted case with a known answer, and a model whose W_O cannot be found. The accessor
itself is tested on every architecture in test_models.py."""

from __future__ import annotations

import random

import pytest
import torch

from memeval.api import SequenceSet, TokenSequence
from memeval.errors import UsageError
from memeval.loading import load_model


def random_set(rng: random.Random, n: int, length: int, vocab: int, avoid: int, first: int | None = None,
               pad: int = 0) -> SequenceSet:
    def ids() -> tuple[int, ...]:
        body = [t for t in (rng.randrange(1, vocab) for _ in range(4 * length)) if t != avoid][:length]
        return tuple(body if first is None else [first] + body[1:])

    return SequenceSet([TokenSequence(f"s{i}", ids(), 0) for i in range(n)], pad)


def test_attention_neurons_active_only_on_the_forget_set_are_pruned_first(tiny_model_dir):
    from memeval_methods.selective_pruning import SelectivePruning

    model = load_model(str(tiny_model_dir("llama")))
    cfg = model.hf.config
    star, d = 7, 3
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        # Hidden dimension 0 of the embeddings is carried by the token `star` only (RMSNorm keeps zeros at
        # zero), and value coordinate d of layer 0's first key/value head reads only that dimension. So the
        # attention neurons h·head_dim + d of the query heads sharing that value head are exactly 0 on text
        # without `star` (the retain set) and non-zero after it (the forget set starts with it).
        emb = model.hf.get_input_embeddings().weight
        emb[:, 0] = 0
        emb[star, 0] = 4.0
        v = model.blocks[0].self_attn.v_proj.weight
        v[d] = 0
        v[d, 0] = 1.0
    planted = {h * head_dim + d for h in range(groups)}
    rng = random.Random(0)
    vocab = len(model.tokenizer)
    forget = random_set(rng, 8, 16, vocab, star, first=star, pad=model.pad_id)
    retain = random_set(rng, 32, 16, vocab, star, pad=model.pad_id)

    # one step (budget = step_fraction) whose attention budget is exactly len(planted) of the 64 attention neurons
    attn_fraction = len(planted) / (model.num_layers * model.attn_width)
    editor = SelectivePruning(SelectivePruning.Config(step_fraction=0.02, attn_fraction=attn_fraction))
    edited = editor.edit(model, forget, retain, 0.02)
    zero = [set(torch.nonzero((edited.attn_out_proj(l) == 0).all(0)).flatten().tolist()) for l in range(2)]
    assert zero == [planted, set()]
    mlp_zero = sum(int((edited.down_proj(l) == 0).all(0).sum()) for l in range(2))
    assert mlp_zero == round(0.02 * 2 * 80)  # the MLP budget is unchanged by attention pruning

    with pytest.raises(UsageError, match="attn_fraction"):
        SelectivePruning(SelectivePruning.Config(attn_fraction=1.5)).edit(model, forget, retain, 0.02)


def test_missing_attention_output_projection_fails_only_when_asked(tiny_model_dir):
    from memeval_methods.selective_pruning import SelectivePruning

    model = load_model(str(tiny_model_dir("gpt2")))
    for block in model.blocks:
        block.attn.c_proj = torch.nn.Identity()
    with pytest.raises(UsageError, match="cannot identify the attention output projection") as err:
        model.attn_out_projs
    assert "\n" not in str(err.value)
    seqs = random_set(random.Random(0), 4, 8, len(model.tokenizer), -1, pad=model.pad_id)
    SelectivePruning().edit(model, seqs, seqs, 0.02)  # MLP-only pruning does not need W_O
    with pytest.raises(UsageError, match="cannot identify the attention output projection"):
        SelectivePruning(SelectivePruning.Config(attn_fraction=0.02)).edit(model, seqs, seqs, 0.02)
