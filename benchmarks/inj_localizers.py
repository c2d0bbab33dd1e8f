"""INJ scoring at batch > 1: seconds per injected item of the five localizers, memeval scoring B items as one
batched model (memeval.batched) against the batch-1 reference loop (benchmarks/mempi_reference.py, MemPi's code
paths, on each item's own injected model) and against memeval's own batch-1 scoring (INJ before batching), and
the share of plain-matmul throughput each run reaches. ``INJ ×ref``: the reference's seconds over those of the path
INJ takes (batched for a localizer with ``per_row_weights``, else b1); ``×ref``: over the batched path.

    python benchmarks/inj_localizers.py                    # organism:tiny and a GPT-2-shaped random model
    python benchmarks/inj_localizers.py --methods hardconcrete,slimming --gpt2-steps 5 --batch 8

Throughput accounting: a run's matrix products (mm, addmm, bmm, baddbmm, CPU flash attention and their backward
ops) are recorded with their shapes, strides and FLOPs (torch.utils.flop_counter's formulas), then replayed alone
on random tensors of the same layout in the same process. ``plain`` = replay seconds / run seconds: 100 % means the
run spends all its time in matmuls as fast as plain ones of its shapes. ``peak`` = the replay's GFLOP/s. ``F ref/F``
is the reference's FLOPs over memeval's: the speed-up memeval would have at equal FLOP/s; the speed-up is bounded by
``F ref/F × peak / (reference GFLOP/s)``. Partial runs (Zero-Out and IG on GPT-2: spread layers, first neurons) are
extrapolated linearly and say so; every ratio compares runs of the same work, interleaved in one process.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from localizers import gpt2_small, import_methods, load_bench_model  # noqa: E402
from mempi_reference import (reference_activations, reference_hardconcrete, reference_ig,  # noqa: E402
                             reference_slimming, reference_zero_out)

aten = torch.ops.aten
RECORDED = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward}


# ---------------------------------------------------------------------------------------------
# Matmul accounting


def _spec(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_spec(v) for v in x)
    return x


class Recorder(TorchDispatchMode):
    """Records the matmul-like ops of a run (layout specs, FLOPs)."""

    def __init__(self):
        super().__init__()
        self.ops, self.flops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in RECORDED:
            self.ops.append((func, _spec(args), _spec(kwargs)))
            if func.overloadpacket in flop_registry:
                self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def _make(spec, cache):
    if isinstance(spec, tuple) and len(spec) == 4 and spec[0] == "T":
        if spec not in cache:
            _, shape, stride, dtype = spec
            n = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 1
            base = torch.randn(n).to(dtype) if dtype.is_floating_point else torch.ones(n, dtype=dtype)
            cache[spec] = base.as_strided(shape, stride)
        return cache[spec]
    if isinstance(spec, (list, tuple)):
        return type(spec)(_make(v, cache) for v in spec)
    if isinstance(spec, dict):
        return {k: _make(v, cache) for k, v in spec.items()}
    return spec


@torch.no_grad()
def replay_seconds(ops) -> float:
    cache = {}
    calls = [(f, _make(a, cache), _make(k, cache)) for f, a, k in ops]
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        for f, a, k in calls:
            f(*a, **k)
        best = min(best, time.perf_counter() - t0)
    return best


def accounted(fns: list, repeats: int, account: bool = True) -> list[tuple[float, float, float]]:
    """(seconds, FLOPs, replay seconds) of each ``fn()``: the fastest of ``repeats`` rounds that run every fn once
    in turn (interleaved, so a slow spell of the machine hits all of them), then one run under the recorder
    (``account=False``: no recorder run; FLOPs and replay seconds are nan)."""
    seconds = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            seconds[i] = min(seconds[i], time.perf_counter() - t0)
    if not account:
        return [(t, math.nan, math.nan) for t in seconds]
    out = []
    for fn, t in zip(fns, seconds):
        rec = Recorder()
        with rec:
            fn()
        out.append((t, rec.flops, replay_seconds(rec.ops)))
    return out


# ---------------------------------------------------------------------------------------------
# Items: sequences and their injected columns


def make_items(model, n: int, tokens: int, ratio: float, given=None, seed: int = 0):
    from memeval.api import TokenSequence

    g = torch.Generator().manual_seed(seed)
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    L, I = model.num_layers, model.num_neurons
    seqs, injections = [], []
    for i in range(n):
        ids = list(given[i % len(given)])[:tokens] if given else torch.randint(0, vocab, (tokens,), generator=g).tolist()
        seqs.append(TokenSequence(f"seq{i}", tuple(ids), 1))  # INJ: the loss covers every token after the first
        chosen = torch.zeros(L * I, dtype=torch.bool)
        chosen[torch.randperm(L * I, generator=g)[: max(1, int(L * I * ratio))]] = True
        layers = {}
        for layer, row in enumerate(chosen.view(L, I)):
            cols = row.nonzero().flatten()
            if len(cols):
                old = model.down_proj(layer).detach()[:, cols]
                layers[layer] = (cols, old + 0.5 * old.std() * torch.randn(old.shape, generator=g))
        injections.append(layers)
    return seqs, injections


def written(work, layers: dict, base):
    """``work`` (a copy of ``base``) with one item's columns written in (MemPi's per-item injected model)."""
    for layer in range(work.num_layers):
        w = base.down_proj(layer).detach().clone()
        if layer in layers:
            w[:, layers[layer][0]] = layers[layer][1]
        work.set_down_proj(layer, w)
    return work


# ---------------------------------------------------------------------------------------------
# One model


def reference(name, model, ids, cfg, args):
    if name == "activations":
        return reference_activations(model, ids, 1, faithful=False)
    if name == "zero_out":
        return reference_zero_out(model, ids, 1, n_batches=args._zero_batches, layers=args._zero_ref_layers,
                                  chunks=args._zero_chunks)
    if name == "ig":
        return reference_ig(model, ids, 1, steps=cfg.steps, layers=args._ig_layers)
    if name == "slimming":
        return reference_slimming(model, ids, 1, cfg)
    return reference_hardconcrete(model, ids, 1, cfg)


def spread(num_layers: int, k: int) -> list[int]:
    """``k`` layers spread evenly from the first to the last (a partial run's cost per layer depends on the layer:
    the reference's IG backward runs from the head down to the patched layer)."""
    k = min(k, num_layers)
    return sorted({round(i * (num_layers - 1) / max(k - 1, 1)) for i in range(k)})


def bench(model, seqs, injections, methods, classes, configs, args, label: str) -> None:
    from memeval.api import Batch
    from memeval.batched import row_weights

    L, I, dev = model.num_layers, model.num_neurons, model.device
    work = model.clone()
    args._layers = spread(L, args._zero_layers or L)
    partial = args._zero_neurons and args._zero_neurons < I
    args._zero_batches = math.ceil(I / args._zero_neurons) if partial else 10  # MemPi's n_batches: 10
    args._zero_chunks = 1 if partial else None
    width = len(torch.arange(I).chunk(args._zero_batches)[0]) if partial else I
    args._zero_ref_layers = args._layers if len(args._layers) < L else None
    args._ig_layers = spread(L, args._ig_ref_layers) if args._ig_ref_layers else None
    print(f"\n## {label}\n# method         items  ref s/item  b1 s/item  batched s/item  INJ ×ref  ×ref   ×b1   F ref/F  "
          f"plain: batched  b1    ref   GFLOP/s: batched  ref  plain  note", flush=True)
    for name in methods:
        cls = classes[name]
        cfg = cls.Config(**configs.get(name, {}))
        items = seqs[: args._slow_items] if name in ("zero_out", "ig") else seqs
        injs = injections[: len(items)]
        ours_cfg, scale_ref, scale_ours, note = cfg, 1.0, 1.0, ""
        if name == "zero_out" and (len(args._layers) < L or width < I):
            ours_cfg = replace(cfg, layers=tuple(args._layers), max_neurons=width)
            scale_ref = scale_ours = L / len(args._layers) * I / width
            note = f"layers {args._layers}, first {width} neurons, × {scale_ref:.1f}"
        if name == "ig" and args._ig_layers:
            scale_ref = L / len(args._ig_layers)
            note = f"reference on layers {args._ig_layers}, × {scale_ref:.1f}"

        def batched():
            with row_weights(model, injs) as m:
                return cls(ours_cfg).localize(m, Batch.from_sequences(items, model.pad_id, dev))

        def batch1():
            for s, inj in zip(items, injs):
                cls(ours_cfg).localize(written(work, inj, model), Batch.from_sequences([s], model.pad_id, dev))

        def ref():
            for s, inj in zip(items, injs):
                reference(name, written(work, inj, model), torch.tensor([s.input_ids], device=dev), cfg, args)

        if args.per_item and not cls.per_row_weights:
            per_item_ratios(name, cls, items, injs, ours_cfg, cfg, args, model, work, scale_ref / scale_ours)
            continue
        if not cls.per_row_weights:  # INJ hands this method one item at a time: its path is the b1 column
            note = "; ".join(x for x in ("INJ scores it one item at a time (b1)", note) if x)
        n = len(items)
        runs = accounted([batched, ref] + ([] if args.no_b1 else [batch1]), args.repeats, not args.no_account)
        (t_b, f_b, r_b), (t_r, f_r, r_r) = runs[:2]
        t_1, f_1, r_1 = runs[2] if not args.no_b1 else (math.nan, math.nan, math.nan)
        s_b, s_1, s_r = t_b / n * scale_ours, t_1 / n * scale_ours, t_r / n * scale_ref
        gf = [f / t / 1e9 if t else math.nan for f, t in ((f_b, t_b), (f_r, t_r), (f_b, r_b))]
        s_inj = s_b if cls.per_row_weights else s_1  # the path INJ takes
        print(f"  {name:14s} {n:5d} {s_r:11.3f} {s_1:10.3f} {s_b:15.3f} {s_r / s_inj:9.2f} {s_r / s_b:6.2f} {s_1 / s_b:5.2f} "
              f"{f_r * scale_ref / (f_b * scale_ours):8.2f}  {r_b / t_b:14.0%} {r_1 / t_1:5.0%} {r_r / t_r:5.0%} "
              f"{gf[0]:16.1f} {gf[1]:5.1f} {gf[2]:6.1f}  {note}", flush=True)


def bare_step_share(model, seqs, repeats: int, steps: int = 20) -> None:
    """The floor for the mask trainers: one masked forward + backward of the model alone (a mask hook per layer,
    suffix NLL, gradient w.r.t. the masks; no method code, no per-row weights) at the batch's shapes, and its share
    of plain-matmul throughput. HardConcrete and Slimming add their own ops to this step."""
    from memeval.api import Batch
    from memeval_methods._common import suffix_nll

    batch = Batch.from_sequences(seqs, model.pad_id, model.device)
    masks = torch.ones(len(seqs), model.num_layers, model.num_neurons, device=model.device, requires_grad=True)

    def run():
        for _ in range(steps):
            with model.intervene({l: (lambda h, l=l: h * masks[:, l][:, None, :]) for l in range(model.num_layers)}):
                lm = suffix_nll(model, batch)
            torch.autograd.grad(lm.sum(), masks)

    ((t, flops, r),) = accounted([run], repeats)
    print(f"  {'(bare step)':14s} {len(seqs):5d}  masked forward + backward of the model alone: "
          f"{t / steps * 1e3:.2f} ms/step, plain {r / t:.0%}, {flops / t / 1e9:.1f} GFLOP/s", flush=True)


def per_item_ratios(name, cls, items, injs, ours_cfg, cfg, args, model, work, scale: float) -> None:
    """For a localizer INJ scores one item at a time: each item's reference and memeval run alternate
    ``args.repeats`` times; per item the fastest of each counts; prints the median and range of the per-item
    ratios (a slow spell of the machine then spoils one item's round, not a whole pass)."""
    from memeval.api import Batch

    ratios, t_ref, t_ours = [], [], []
    for s, inj in zip(items, injs):
        best = [math.inf, math.inf]
        for _ in range(args.repeats):
            for k in (0, 1):
                m = written(work, inj, model)
                t0 = time.perf_counter()
                if k == 0:
                    reference(name, m, torch.tensor([s.input_ids], device=model.device), cfg, args)
                else:
                    cls(ours_cfg).localize(m, Batch.from_sequences([s], model.pad_id, model.device))
                best[k] = min(best[k], time.perf_counter() - t0)
        t_ref.append(best[0])
        t_ours.append(best[1])
        ratios.append(best[0] / best[1] * scale)
    ratios.sort()
    mid = statistics.median(ratios)
    print(f"  {name:14s} {len(items):5d}  per item, best of {args.repeats} alternating: ref {sum(t_ref) / len(t_ref):.3f} "
          f"s, b1 {sum(t_ours) / len(t_ours):.3f} s (unscaled); ×ref median {mid:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}",
          flush=True)


def organism_items(spec: str, args):
    model, _ = load_bench_model(spec, args.build)
    try:
        from memeval.protocols.sources import organism_for, texts_to_sequences

        texts = organism_for(spec).new_entities
        seqs = texts_to_sequences(texts, model.tokenizer, args.tokens, 1, "seq")
        given = [s.input_ids for s in seqs]
    except Exception as e:  # the fallback model has no organism data
        print(f"# organism texts unavailable ({type(e).__name__}); random tokens", flush=True)
        given = None
    return model, given


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism:tiny", help="none: only the GPT-2-shaped model")
    ap.add_argument("--methods", default="activations,hardconcrete,slimming,zero_out,ig")
    ap.add_argument("--batch", type=int, default=8, help="injected items per batched call")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per organism item (inj_organism: 32)")
    ap.add_argument("--ratio", type=float, default=0.2, help="organism injection ratio (inj_organism: 0.2)")
    ap.add_argument("--slow-items", type=int, default=0, help="items for Zero-Out and IG (0 = --batch)")
    ap.add_argument("--gpt2-layers", type=int, default=12, help="0 skips the GPT-2-shaped model")
    ap.add_argument("--gpt2-tokens", type=int, default=64)
    ap.add_argument("--gpt2-ratio", type=float, default=0.001, help="MemPi's GPT-2 INJ ratio")
    ap.add_argument("--gpt2-steps", type=int, default=5, help="HardConcrete/Slimming steps on GPT-2 (no stop)")
    ap.add_argument("--gpt2-slow-items", type=int, default=2)
    ap.add_argument("--gpt2-zero-layers", type=int, default=3, help="Zero-Out layers run (spread; both sides)")
    ap.add_argument("--gpt2-zero-neurons", type=int, default=64, help="Zero-Out neurons per layer (both sides)")
    ap.add_argument("--gpt2-ig-tokens", type=int, default=16, help="IG sequence length on GPT-2")
    ap.add_argument("--gpt2-ig-ref-layers", type=int, default=3,
                    help="layers the IG reference runs (spread from first to last; its cost falls with the layer)")
    ap.add_argument("--no-b1", action="store_true", help="skip memeval's batch-1 scoring")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (interleaved); the fastest counts")
    ap.add_argument("--no-account", action="store_true", help="time only (no FLOP count, no plain-matmul replay)")
    ap.add_argument("--per-item", action="store_true",
                    help="localizers INJ scores one at a time: per-item alternating timing, median ratio")
    ap.add_argument("--build", action="store_true", help="build the organism if it is not cached yet")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(True)
    classes = import_methods()
    methods = [{"integrated_gradients": "ig"}.get(m, m) for m in args.methods.split(",") if m]
    print(f"# machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f" with {torch.get_num_threads()} threads; load average {os.getloadavg()} at start", flush=True)
    if args.model != "none":
        model, given = organism_items(args.model, args)
        seqs, injs = make_items(model, args.batch, args.tokens, args.ratio, given)
        args._zero_layers = args._zero_neurons = args._ig_ref_layers = 0
        args._slow_items = args.slow_items or args.batch
        inj = {"slimming": {"lr": 5.0e-2, "lambda_l1": 300, "max_steps": 100},  # tasks/inj/inj_organism.yaml
               "hardconcrete": {"lr": 1.0e-2, "lambda_l0": 30, "p_init": 0.9, "max_steps": 200, "stop_loss": 0.2}}
        bench(model, seqs, injs, methods, classes, inj, args,
              f"{model.spec}: {model.num_layers} × {model.num_neurons}, {args.batch} items of ≤ {args.tokens} "
              f"tokens, r = {args.ratio}, inj_organism's method configs")
        if {"hardconcrete", "slimming"} & set(methods):
            bare_step_share(model, seqs, args.repeats)
    if args.gpt2_layers > 0:
        model = gpt2_small(args.gpt2_layers)
        steps = args.gpt2_steps
        mempi = {"hardconcrete": {"lr": 1e-2, "lambda_l0": 1000, "p_init": 0.5, "beta": 0.33, "stop_loss": 0.4,
                                  "max_steps": steps},
                 "slimming": {"lr": 5e-3, "lambda_l1": 15000, "stop_loss": 0.2, "max_steps": steps}}
        args._zero_layers, args._zero_neurons = args.gpt2_zero_layers, args.gpt2_zero_neurons
        args._ig_ref_layers, args._slow_items = args.gpt2_ig_ref_layers, args.gpt2_slow_items
        fast = [m for m in methods if m != "ig"]
        seqs, injs = make_items(model, args.batch, args.gpt2_tokens, args.gpt2_ratio)
        label = (f"{model.spec}, vocab 50257: {args.batch} items of {args.gpt2_tokens} tokens, r = {args.gpt2_ratio}, "
                 f"MemPi's GPT-2 INJ configs at {steps} steps")
        bench(model, seqs, injs, fast, classes, mempi, args, label)
        if "ig" in methods:
            seqs, injs = make_items(model, args.batch, args.gpt2_ig_tokens, args.gpt2_ratio)
            bench(model, seqs, injs, ["ig"], classes, {}, args, f"{model.spec}: IG on {args.gpt2_ig_tokens} tokens")
    print(f"# load average {os.getloadavg()} at the end", flush=True)


if __name__ == "__main__":
    main()
