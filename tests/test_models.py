"""The neuron view of every supported architecture, on tiny random models built locally."""

from __future__ import annotations

import pytest
import torch

from memeval.api import Batch, TokenSequence
from memeval.errors import UsageError
from memeval.loading import load_model, resolve_device
from memeval.testing import ARCHITECTURES

SEQS = [TokenSequence("a", (5, 9, 13, 17, 21, 25, 29, 33), 3),
        TokenSequence("b", (7, 3, 11, 40, 2), 2),
        TokenSequence("c", (8, 8, 9, 10, 11, 12), 1)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request, tiny_model_dir):
    return load_model(str(tiny_model_dir(request.param)))


def test_neurons_found_by_structure(model):
    # The tiny configs use an MLP width of 80 with hidden 32: never 4 × hidden.
    assert model.num_layers == 2
    assert model.num_neurons == 80
    assert model.down_proj(1).shape == (32, 80)


def test_capture_shapes_and_zero_ablation_changes_output(model):
    batch = Batch.from_sequences(SEQS, model.pad_id, model.device)
    with torch.no_grad(), model.capture([0, 1]) as acts:
        clean = model.logits(batch)
    assert acts[0].shape == (3, 8, 80)
    with torch.no_grad(), model.intervene({1: torch.zeros_like}):
        ablated = model.logits(batch)
    assert not torch.allclose(clean, ablated)
    with torch.no_grad():  # hooks are removed on exit
        assert torch.allclose(model.logits(batch), clean)


def test_attention_neurons_found_by_structure(model):
    # 4 heads of head_dim 8 in every tiny config: W_O maps 32 attention neurons to the hidden size 32
    assert len(model.attn_out_projs) == model.num_layers
    assert model.attn_width == 32
    assert model.attn_out_proj(1).shape == (32, 32)
    assert not set(map(id, model.attn_out_projs)) & set(map(id, model.down_projs))
    batch = Batch.from_sequences(SEQS, model.pad_id, model.device)
    with torch.no_grad(), model.capture([1], attention=True) as acts:
        clean = model.logits(batch)
    assert acts[1].shape == (3, 8, 32)  # [B, T, attn_width], also where the model flattens tokens (OPT)
    with torch.no_grad(), model.ablate({1: torch.tensor([2, 19])}, attention=True):
        assert not torch.allclose(model.logits(batch), clean)


@pytest.mark.parametrize("attention", [False, True], ids=["mlp", "attention"])
def test_ablating_given_neurons_equals_zeroing_their_columns(model, attention):
    batch = Batch.from_sequences(SEQS[:1], model.pad_id, model.device)
    idx = torch.tensor([3, 17, 29])
    with torch.no_grad(), model.ablate({1: idx}, attention=attention):
        via_hook = model.logits(batch)
    edited = model.clone()
    get, put = ((edited.attn_out_proj, edited.set_attn_out_proj) if attention
                else (edited.down_proj, edited.set_down_proj))
    w = get(1).detach().clone()
    w[:, idx] = 0
    put(1, w)
    with torch.no_grad():
        via_weights = edited.logits(batch)
    torch.testing.assert_close(via_hook, via_weights, rtol=1e-5, atol=1e-5)


def test_sequence_nll_matches_hand_computation_and_batch_of_one(model):
    batch = Batch.from_sequences(SEQS, model.pad_id, model.device)
    with torch.no_grad():
        nll = model.sequence_nll(batch)
        for row, seq in enumerate(SEQS):
            single = Batch.from_sequences([seq], model.pad_id, model.device)
            logp = torch.log_softmax(model.logits(single)[0].float(), -1)
            ids = seq.input_ids
            by_hand = -sum(logp[t - 1, ids[t]] for t in range(seq.prefix_len, len(ids))) / (len(ids) - seq.prefix_len)
            torch.testing.assert_close(nll[row], by_hand, rtol=1e-4, atol=1e-5)


def test_fingerprint_detects_one_changed_weight(model):
    before = model.fingerprint()
    copy = model.clone()
    assert copy.fingerprint() == before
    with torch.no_grad():
        copy.down_proj(1)[5, 7] += 1e-3
    assert copy.fingerprint() != before
    assert model.fingerprint() == before  # the clone is independent


def test_unknown_spec_and_missing_cuda_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        load_model(str(tmp_path / "nope"))
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unreachable_hub_model_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from memeval.loading import load_model; load_model('hf:memeval-test/no-such-model')"
    proc = subprocess.run([sys.executable, "-c", f"import sys\nfrom memeval.errors import UsageError\ntry:\n    {code}\n"
                           f"except UsageError as e:\n    print(e); sys.exit(2)"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout.count("\n") == 1 and "hf:memeval-test/no-such-model" in proc.stdout
    assert "huggingface-cli download" in proc.stdout
