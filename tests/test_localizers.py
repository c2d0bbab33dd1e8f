"""The five MemPi localizers: batched output = batch-1 output, fast paths = naive/reference loops, planted neurons
are found, and the model is never modified."""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from memeval.api import Batch, TokenSequence
from memeval.models import NeuronModel
from memeval.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("memeval_bench_localizers", ROOT / "benchmarks" / "localizers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()
CLASSES = bench.import_methods()  # also makes memeval_methods importable from an uninstalled tree
from memeval_methods._common import optimise_masks  # noqa: E402

ARCHS = ("gpt2", "gpt_neox", "llama")
VOCAB = 100

# small step counts so the file runs in seconds; λ small enough that the LM term matters
FAST = {
    "activations": {},
    "zero_out": {},
    "ig": {"steps": 8},
    "slimming": {"lr": 0.05, "lambda_l1": 2.0, "max_steps": 20, "stop_loss": 0.8, "check_every": 5},
    "hardconcrete": {"lr": 0.05, "lambda_l0": 2.0, "max_steps": 20, "stop_loss": 0.7, "check_every": 5},
}


def _model(arch: str, seed: int = 0) -> NeuronModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, hidden=32, layers=2, intermediate=80))
    return NeuronModel(hf, None, f"tiny-{arch}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads on shared cores; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict[str, NeuronModel]:
    return {arch: _model(arch) for arch in ARCHS + ("olmo2",)}


def _sequences(lengths=(12, 9, 6, 10), prefixes=(4, 3, 1, 5), seed: int = 1) -> list[TokenSequence]:
    g = torch.Generator().manual_seed(seed)
    return [TokenSequence(f"item-{i}", tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist()), p)
            for i, (n, p) in enumerate(zip(lengths, prefixes))]


def _batch(model, seqs) -> Batch:
    return Batch.from_sequences(seqs, 0, model.device)


def _close(a: torch.Tensor, b: torch.Tensor, rtol=1e-4, atol_frac=1e-4) -> bool:
    return torch.allclose(a, b, rtol=rtol, atol=atol_frac * float(b.abs().max()) + 1e-7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(FAST))
def test_batched_equals_batch1(models, arch, method):
    model = models[arch]
    cls = CLASSES[method]
    loc = cls(cls.Config(**FAST[method]))
    seqs = _sequences()[:3]
    fp = model.fingerprint()
    full = loc.localize(model, _batch(model, seqs))
    assert full.shape == (len(seqs), model.num_layers, model.num_neurons)
    assert torch.isfinite(full).all()
    for i, s in enumerate(seqs):
        one = loc.localize(model, _batch(model, [s]))[0]
        assert _close(full[i], one), f"{method}/{arch}: row {i} differs by {(full[i] - one).abs().max():.3g}"
    assert model.fingerprint() == fp, f"{method} modified the model"


def test_mask_methods_stop_rows_independently(models):
    """Slimming with a stop threshold that rows reach at different checks: batched = batch-1 still."""
    model = models["gpt2"]
    seqs = _sequences()
    cfg = CLASSES["slimming"].Config(lr=0.05, lambda_l1=2.0, max_steps=40, stop_loss=0.9, check_every=2)
    out = CLASSES["slimming"](cfg).localize(model, _batch(model, seqs))
    means = out.mean(dim=(1, 2))
    assert (means < 1).all()
    for i, s in enumerate(seqs):
        assert _close(out[i], CLASSES["slimming"](cfg).localize(model, _batch(model, [s]))[0])


def test_optimise_masks_matches_torch_adam_with_per_row_stops():
    """The row-wise optimiser equals torch.optim.Adam run per row with MemPi's stop rule; rows stop at different
    steps and a stopped row is never touched again."""
    targets = torch.tensor([[0.0, 0.0], [0.9, 0.8], [0.6, 0.5]])
    batch = Batch(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
                  torch.ones(3, 2, dtype=torch.bool), ["a", "b", "c"])
    stops = {}

    def loss_fn(p, sub, rows):
        return ((p - targets[rows]) ** 2).sum(1), p.abs().mean(1)

    got = optimise_masks(torch.ones(3, 2), batch, loss_fn, lr=0.01, lam=0.5, max_steps=300, stop_loss=0.55)
    for r in range(3):
        p = torch.ones(2, requires_grad=True)
        opt = torch.optim.Adam([p], lr=0.01)
        for i in range(300):
            opt.zero_grad()
            lm, reg = ((p - targets[r]) ** 2).sum(), p.abs().mean()
            if (i + 1) % 10 == 0 and reg < 0.55:
                stops[r] = i
                break
            (lm + 0.5 * reg).backward()
            opt.step()
        assert torch.allclose(got[r], p.detach(), atol=1e-6), (r, got[r], p)
    assert stops == {0: 49, 2: 59}  # rows stop at different checks, row 1 runs to max_steps


@pytest.mark.parametrize("arch", ARCHS + ("olmo2",))
def test_zero_out_fast_path_equals_naive_ablation(models, arch):
    """OLMo-2 has a norm after the MLP, so the rank-1 shortcut must be detected as invalid there."""
    model = models[arch]
    seqs = _sequences()[:2] + _sequences()[2:3]
    fast = CLASSES["zero_out"]().localize(model, _batch(model, seqs))
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.input_ids])
        # naive: every ablation variant through the full model (MemPi's chunked loop, one chunk per layer)
        naive = bench.reference_zero_out(model, ids, s.prefix_len, n_batches=1)
        assert torch.allclose(fast[i], naive, atol=2e-6, rtol=1e-3), (fast[i] - naive).abs().max()
        row = _batch(model, [s])
        with torch.no_grad():  # and a few single ablations through the model's own primitive
            clean = model.sequence_nll(row)
            for l, j in [(0, 0), (0, 41), (1, 3), (1, model.num_neurons - 1)]:
                with model.ablate({l: torch.tensor([j])}):
                    delta = model.sequence_nll(row) - clean
                assert abs(float(delta[0] - fast[i, l, j])) <= 2e-6 + 1e-3 * abs(float(delta[0]))


@pytest.mark.parametrize("arch", ARCHS)
def test_ig_equals_reference_rerun_loop(models, arch):
    model = models[arch]
    seqs = _sequences()[:3]
    ours = CLASSES["ig"](CLASSES["ig"].Config(steps=6)).localize(model, _batch(model, seqs))
    for i, s in enumerate(seqs):
        ref = bench.reference_ig(model, torch.tensor([s.input_ids]), s.prefix_len, steps=6, n_batches=2)
        assert _close(ours[i], ref, rtol=1e-3, atol_frac=1e-4), (ours[i] - ref).abs().max()


def test_ig_slot_cache_equals_transformers_copying_cache(models, monkeypatch):
    """IG writes each single-token forward's key/value into a preallocated slot; transformers' own cache
    (concatenation, the fallback before 4.56) must give the same floats."""
    ig = importlib.import_module("memeval_methods.integrated_gradients")
    model, seqs = models["gpt_neox"], _sequences()[:3]
    kv = [(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8))]
    assert isinstance(ig._slot_cache(kv).layers[0], ig._SlotLayer)  # the installed transformers takes the slot path
    slots = CLASSES["ig"](CLASSES["ig"].Config(steps=4)).localize(model, _batch(model, seqs))
    monkeypatch.setattr(ig, "DynamicLayer", None)
    copying = CLASSES["ig"](CLASSES["ig"].Config(steps=4)).localize(model, _batch(model, seqs))
    assert torch.equal(slots, copying)


def test_ig_skips_blocks_below_the_patched_layer_and_falls_back_when_they_do_not_compose(models, monkeypatch):
    """Blocks below layer l return their recorded clean output instead of running; if the recorded outputs do not
    reproduce the clean logits (here: corrupted), IG runs every block and gives the floats of the plain path."""
    ig = importlib.import_module("memeval_methods.integrated_gradients")
    model, seqs = models["gpt_neox"], _sequences()[:3]
    localize = CLASSES["ig"](CLASSES["ig"].Config(steps=4)).localize
    runs = []
    handle = model.down_projs[0].register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        shortcut = localize(model, _batch(model, seqs))
        with_shortcut, runs[:] = len(runs), []
        recorded = ig._block_outputs

        @contextmanager
        def nothing_recorded(blocks):
            yield {}

        monkeypatch.setattr(ig, "_block_outputs", nothing_recorded)
        plain = localize(model, _batch(model, seqs))
        without, runs[:] = len(runs), []

        @contextmanager
        def corrupted(blocks):
            with recorded(blocks) as outs:
                yield outs
            for j in outs:
                outs[j] = outs[j] * 2

        monkeypatch.setattr(ig, "_block_outputs", corrupted)
        fallback = localize(model, _batch(model, seqs))
    finally:
        handle.remove()
    chunks = (without - 1) // model.num_layers
    assert with_shortcut == 1 + chunks and chunks >= 1  # block 0 ran in the clean forward and once per chunk
    assert _close(shortcut, plain, rtol=1e-4, atol_frac=1e-5)
    assert torch.equal(fallback, plain)


def test_activations_paper_and_faithful(models):
    model = models["gpt_neox"]
    seqs = _sequences()
    act = CLASSES["activations"]
    paper = act().localize(model, _batch(model, seqs))
    faithful = act(act.Config(faithful=True)).localize(model, _batch(model, seqs))
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.input_ids])
        assert _close(faithful[i], bench.reference_activations(model, ids, s.prefix_len, faithful=True))
        assert _close(paper[i], bench.reference_activations(model, ids, s.prefix_len, faithful=False))
    assert (paper >= faithful - 1e-6).all()  # mean|h| ≥ |mean h|


def test_slimming_equals_reference_loop(models):
    model = models["llama"]
    seqs = _sequences()[:2]
    cfg = CLASSES["slimming"].Config(**FAST["slimming"])
    ours = CLASSES["slimming"](cfg).localize(model, _batch(model, seqs))
    for i, s in enumerate(seqs):
        ref = bench.reference_slimming(model, torch.tensor([s.input_ids]), s.prefix_len, cfg)
        assert torch.allclose(ours[i], ref, atol=2e-5), (ours[i] - ref).abs().max()


# ---------------------------------------------------------------------------------------------
# A planted memorizing neuron


@pytest.fixture(scope="module")
def planted():
    """GPT-2 tiny model where neuron (1, 7) is always active and writes the unembedding direction of token 42."""
    model = _model("gpt2", seed=3)
    layer, j, y = 1, 7, 42
    mlp = model.blocks[layer].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, j] = 0.0
        mlp.c_fc.bias[j] = 3.0  # h_j = gelu(3) ≈ 3 at every position
        u = model.hf.get_output_embeddings().weight[y].clone()
        u = (u - u.mean()) / u.norm()
        w = model.down_proj(layer).clone()
        w[:, j] = 1.5 * u
        model.set_down_proj(layer, w)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(1, VOCAB, (5,), generator=g).tolist()
    seq = TokenSequence("planted", tuple(prefix + [y] * 6), 5)
    return model, seq, (layer, j)


@pytest.mark.parametrize("method", ["activations", "zero_out", "ig", "slimming", "hardconcrete"])
def test_planted_neuron_ranks_first(planted, method):
    model, seq, (layer, j) = planted
    cfg = dict(FAST[method])
    if method in ("slimming", "hardconcrete"):
        cfg.update(max_steps=60, stop_loss=0.0)
    cls = CLASSES[method]
    scores = cls(cls.Config(**cfg)).localize(model, _batch(model, [seq]))[0]
    flat = scores.flatten()
    target = scores[layer, j]
    above = int((flat > target).sum())
    ties = int((flat == target).sum())
    assert above == 0, f"{method}: {above} neurons score above the planted one"
    assert ties <= max(3, flat.numel() // 50), f"{method}: {ties} neurons tie with the planted one"
