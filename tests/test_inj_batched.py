"""INJ at batch > 1: B injected models as one batched model (memeval.batched) give every localizer the scores it
gives each injected model alone, and the INJ protocol's metrics do not depend on the batch."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from memeval.api import Batch, Localizer, TokenSequence
from memeval.batched import row_weights
from memeval.models import NeuronModel
from memeval.protocols.injection import InjectionData, InjectionParams, InjectionProtocol
from memeval.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("gpt2", "gpt_neox")
VOCAB = 100


def _classes():
    spec = importlib.util.spec_from_file_location("memeval_bench_localizers", ROOT / "benchmarks" / "localizers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.import_methods()


CLASSES = _classes()
FAST = {
    "activations": {},
    "zero_out": {},
    "ig": {"steps": 6},
    "slimming": {"lr": 0.05, "lambda_l1": 2.0, "max_steps": 20, "stop_loss": 0.8, "check_every": 5},
    "hardconcrete": {"lr": 0.05, "lambda_l0": 2.0, "max_steps": 20, "stop_loss": 0.7, "check_every": 5},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict[str, NeuronModel]:
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, hidden=32, layers=2, intermediate=80))
        out[arch] = NeuronModel(hf, None, f"tiny-{arch}")
    return out


def _sequences(n: int = 3) -> list[TokenSequence]:
    g = torch.Generator().manual_seed(1)
    lengths = (12, 9, 6, 10)
    return [TokenSequence(f"item-{i}", tuple(torch.randint(1, VOCAB, (lengths[i],), generator=g).tolist()), 1)
            for i in range(n)]


def _injections(model: NeuronModel, n: int, seed: int = 2) -> list[dict]:
    """Per row, random columns of each layer rewritten (different counts per row; row 1 leaves layer 0 alone)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        layers = {}
        for layer in range(model.num_layers):
            if b == 1 and layer == 0:
                continue
            cols = torch.randperm(model.num_neurons, generator=g)[: 3 + 4 * b + layer]
            old = model.down_proj(layer).detach()[:, cols]
            layers[layer] = (cols, old * 1.5 + 0.3 * torch.randn(old.shape, generator=g))
        out.append(layers)
    return out


def _alone(model: NeuronModel, layers: dict) -> NeuronModel:
    one = model.clone()
    for layer, (cols, new) in layers.items():
        w = one.down_proj(layer).detach().clone()
        w[:, cols] = new
        one.set_down_proj(layer, w)
    return one


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(FAST) + ["slimming_stops"])
def test_batched_injected_model_equals_each_injected_model_alone(models, arch, method):
    model = models[arch]
    config = ({"lr": 0.05, "lambda_l1": 2.0, "max_steps": 40, "stop_loss": 0.9, "check_every": 2}
              if method == "slimming_stops" else FAST[method])  # rows stop at different checks
    cls = CLASSES[method.removesuffix("_stops")]
    # IG and Zero-Out follow the rules but INJ scores them one item at a time (faster for them)
    assert cls.per_row_weights or method in ("ig", "zero_out")
    seqs = _sequences()
    inj = _injections(model, len(seqs))
    fp = model.fingerprint()
    with row_weights(model, inj) as rows:
        batched = cls(cls.Config(**config)).localize(rows, Batch.from_sequences(seqs, 0, model.device))
    assert model.fingerprint() == fp
    assert batched.shape == (len(seqs), model.num_layers, model.num_neurons)
    base = cls(cls.Config(**config)).localize(model, Batch.from_sequences(seqs[:1], 0, model.device))[0]
    for b, s in enumerate(seqs):
        alone = cls(cls.Config(**config)).localize(_alone(model, inj[b]), Batch.from_sequences([s], 0, model.device))
        assert _close(batched[b], alone[0]), f"{method}/{arch} row {b}: {(batched[b] - alone[0]).abs().max():.3g}"
    assert not _close(batched[0], base), "the injected columns changed nothing: the test would pass vacuously"


def test_batched_model_reads_and_forwards_only_with_rows_named(models):
    model = models["gpt2"]
    seqs = _sequences()
    inj = _injections(model, 3)
    batch = Batch.from_sequences(seqs, 0, model.device)
    clean = model.logits(batch)
    with torch.no_grad(), row_weights(model, inj) as rows:
        with pytest.raises(RuntimeError, match="row=b"):
            rows.down_proj(0)
        assert torch.equal(rows.down_proj(1, row=2), _alone(model, inj[2]).down_proj(1))
        with pytest.raises(RuntimeError, match="model.rows"):
            rows.logits(batch.select([0, 1]))  # 2 forward rows, 3 rows' weights, none named
        with rows.rows([2, 0]):
            pair = rows.logits(batch.select([2, 0]))
        with rows.rows([2]):
            assert torch.equal(rows.down_proj(1), rows.down_proj(1, row=2))
            repeated = rows.logits(batch.select([2, 2]))
        full = rows.logits(batch)
    assert _close(pair[0], full[2]) and _close(pair[1], full[0]) and _close(repeated[1], full[2])
    alone = _alone(model, inj[2]).logits(batch.select([2]))[0]
    assert _close(full[2], alone) and not _close(full[2], clean[2])
    assert torch.equal(model.logits(batch), clean)  # hooks removed on exit


class ColumnNorm(Localizer):
    """Reads weights without a row: must be scored one item at a time (per_row_weights stays False)."""

    name = "column_norm_test"

    def localize(self, model, batch):
        return torch.stack([model.down_proj(l).norm(dim=0) for l in range(model.num_layers)])[None].expand(
            len(batch), -1, -1)


def _protocol(model: NeuronModel, seqs: list[TokenSequence]) -> InjectionProtocol:
    task = SimpleNamespace(data=InjectionData(), params=InjectionParams(ratio=0.1, multiples=[1, 2]), path="t")
    proto = InjectionProtocol(task, model, seed=0)
    proto.count = int(model.num_layers * model.num_neurons * 0.1)
    proto.sequences = {s.id: s for s in seqs}
    proto.dev_ids = []
    g = torch.Generator().manual_seed(3)
    proto.injections = {}
    for i, s in enumerate(seqs):
        gold = proto.gold_mask(s.id)
        layers = {}
        for layer in range(model.num_layers):
            cols = gold[layer].nonzero().flatten()
            old = model.down_proj(layer).detach()[:, cols]
            layers[layer] = (cols, old * 3 + torch.randn(old.shape, generator=g))
        proto.injections[s.id] = {"layers": layers, "success": i != 1, "final_loss": 0.0}
    proto.work = model.clone()
    return proto


@pytest.mark.parametrize("method", ["activations", "hardconcrete", "column_norm"])
def test_inj_metrics_do_not_depend_on_the_batch(models, method):
    model = models["gpt_neox"]
    seqs = _sequences(4)
    proto = _protocol(model, seqs)
    cls = ColumnNorm if method == "column_norm" else CLASSES[method]
    loc = cls(cls.Config(**FAST.get(method, {})))
    items = [s.id for s in seqs]
    together = proto.evaluate(loc, items)
    alone = [proto.evaluate(loc, [i])[0] for i in items]
    assert together[1] == alone[1] == {name: None for name in proto.metrics()} | {"injected": 0.0}
    for t, a in zip(together, alone):
        assert t.keys() == a.keys()
        assert all(t[k] == pytest.approx(a[k], abs=1e-6) for k in t if t[k] is not None)
    if method == "column_norm":  # a weight reader finds the rescaled columns only if it sees each row's own
        assert all(m["auc"] > 0.9 for m in together if m["injected"])
    assert proto.work.fingerprint() == model.fingerprint()


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_out_on_the_batched_model_gives_the_floats_of_batch_1(models, arch):
    """Zero-Out scores a row inside model.rows([b]): that row's columns are written in place for the block, so its
    scores are bit for bit those of its own model, and the shared weights are restored bit for bit after."""
    model = models[arch]
    seqs = _sequences()
    inj = _injections(model, len(seqs))
    before = [model.down_proj(l).detach().clone() for l in range(model.num_layers)]
    zero_out = CLASSES["zero_out"]()
    with row_weights(model, inj) as rows:
        batched = zero_out.localize(rows, Batch.from_sequences(seqs, 0, model.device))
        with torch.no_grad(), rows.rows([1]):
            with pytest.raises(RuntimeError, match="in place"):
                rows.down_proj(0, row=2)
    assert all(torch.equal(model.down_proj(l), w) for l, w in enumerate(before))
    for b, s in enumerate(seqs):
        alone = zero_out.localize(_alone(model, inj[b]), Batch.from_sequences([s], 0, model.device))[0]
        assert torch.equal(batched[b], alone), f"row {b}: {(batched[b] - alone).abs().max():.3g}"
