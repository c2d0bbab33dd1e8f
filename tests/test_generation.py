"""memeval.generation: batched greedy generation and the teacher-forced greedy-match shortcut."""

from __future__ import annotations

import pytest
import torch

from memeval.api import TokenSequence
from memeval.generation import GreedyMatch, greedy_continuations, greedy_match
from memeval.loading import load_model


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain batch-1 greedy decoding with transformers' own ``generate`` (no EOS stop, no processors)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=0, eos_token_id=None, pad_token_id=model.pad_id, num_beams=1)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_batched_left_padded_generation_equals_batch_one(tiny_model_dir, arch):
    model = load_model(str(tiny_model_dir(arch)))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7)]
    batched = greedy_continuations(model, prompts, 10, batch_size=6)
    single = [greedy_continuations(model, [p], 10, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert [_hf_greedy(model, p, 10) for p in prompts] == single
    assert all(len(c) == 10 for c in batched)


def test_per_prompt_token_counts(tiny_model_dir):
    model = load_model(str(tiny_model_dir("gpt2")))
    prompts = [[5, 6, 7], [8, 9], [10]]
    out = greedy_continuations(model, prompts, [4, 0, 2])
    assert [len(c) for c in out] == [4, 0, 2]
    assert out[0] == greedy_continuations(model, [prompts[0]], 4)[0]
    assert out[2] == greedy_continuations(model, [prompts[2]], 4)[0][:2]


def test_greedy_match_shortcut_equals_plain_generation_on_micro_organism(micro_organism):
    """The shortcut (one teacher-forced pass + tails) equals plain greedy generation, on memorized
    sequences (no tail), partly memorized ones and never-seen text (mismatch at once)."""
    model = micro_organism.load()
    k = micro_organism.prefix_len
    rows = micro_organism.planted + micro_organism.controls
    seqs = [TokenSequence(r["id"], tuple(r["input_ids"]), k) for r in rows]
    matched = greedy_match(model, seqs, batch_size=16)
    plain = greedy_continuations(model, [list(s.input_ids[:k]) for s in seqs], len(seqs[0].input_ids) - k,
                                 batch_size=1)
    assert [list(m.continuation) for m in matched] == plain
    for m, s in zip(matched, seqs):
        assert list(m.matches) == [a == b for a, b in zip(m.continuation, s.input_ids[k:])]
    firsts = {m.first_mismatch for m in matched}
    ell = len(seqs[0].input_ids) - k
    assert ell in firsts and 0 in firsts and firsts - {0, ell}, "the organism gives full, partial and no matches"


def test_greedy_match_definitions():
    m = GreedyMatch((1, 2, 9, 4), (True, True, False, True))
    assert m.score == 0.75 and not m.exact and m.first_mismatch == 2
    assert GreedyMatch((1,), (True,)).exact


def test_greedy_match_needs_a_prefix(tiny_model_dir):
    model = load_model(str(tiny_model_dir("gpt2")))
    with pytest.raises(ValueError, match="prefix"):
        greedy_match(model, [TokenSequence("a", (1, 2, 3), 0)])
