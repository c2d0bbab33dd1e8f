"""Seconds per sequence of the five MemPi localizers: memeval (batched) vs a faithful batch-1 fp32 loop of the
reference algorithm (terarachang/MemPi), same model, same cores, interleaved in one process, with the speed ratio
and the agreement of their scores (Spearman over all neurons, top-1% overlap).

    python benchmarks/localizers.py                       # organism:tiny (or its fallback) + GPT-2-small arch
    python benchmarks/localizers.py --model organism:tiny --methods ig,zero_out --gpt2-layers 12

The reference loops (`benchmarks/mempi_reference.py`) re-implement MemPi's code paths one sequence at a time.
The two reference loops whose cost is identical for every layer (IG, Zero-Out) can be run on a subset of layers
(and of Zero-Out's chunks) with their time extrapolated linearly (`--ref-layers`, `--ref-zero-chunks`); the
agreement is then computed on that subset.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from mempi_reference import (reference_activations, reference_hardconcrete, reference_ig,  # noqa: E402
                             reference_slimming, reference_zero_out)


def import_methods():
    """``memeval_methods`` (the ``methods/`` directory), importable even from an uninstalled source tree."""
    try:
        import memeval_methods  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location("memeval_methods", ROOT / "methods" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "methods")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["memeval_methods"] = mod
        spec.loader.exec_module(mod)
    from memeval_methods.activations import Activations
    from memeval_methods.hardconcrete import HardConcrete
    from memeval_methods.integrated_gradients import IntegratedGradients
    from memeval_methods.slimming import Slimming
    from memeval_methods.zero_out import ZeroOut

    return {"activations": Activations, "zero_out": ZeroOut, "ig": IntegratedGradients, "slimming": Slimming,
            "hardconcrete": HardConcrete}


# ---------------------------------------------------------------------------------------------
# Timed reference runs


def run_reference(name: str, model, ids, prefix_len: int, cfg, args, item_id: str = ""):
    if name == "activations":
        return reference_activations(model, ids, prefix_len, faithful=True)
    if name == "zero_out":
        return reference_zero_out(model, ids, prefix_len, n_batches=args.zero_batches,
                                  layers=args._ref_layers, chunks=args.ref_zero_chunks or None)[:, : args._zero_width]
    if name == "ig":
        return reference_ig(model, ids, prefix_len, steps=cfg.steps, layers=args._ref_layers)
    if name == "slimming":
        return reference_slimming(model, ids, prefix_len, cfg)
    if name == "hardconcrete":
        return reference_hardconcrete(model, ids, prefix_len, cfg)
    if name == "hardconcrete_same_noise":
        from memeval_methods._common import row_generator

        return reference_hardconcrete(model, ids, prefix_len, cfg, generator=row_generator(model, cfg.seed, item_id))
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# Agreement


def _rank(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = ~(a.isnan() | b.isnan())
    ra, rb = _rank(a[ok].double()), _rank(b[ok].double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, frac: float = 0.01) -> float:
    """Overlap of the per-layer top-frac neurons (the protocols' selection rule), over the computed layers."""
    hits = total = 0
    for la, lb in zip(a, b):
        ok = ~(la.isnan() | lb.isnan())
        if not bool(ok.any()):
            continue
        la, lb = la[ok], lb[ok]
        k = max(1, int(round(la.numel() * frac)))
        sa, sb = set(la.topk(k).indices.tolist()), set(lb.topk(k).indices.tolist())
        hits += len(sa & sb)
        total += k
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Models and data


def gpt2_small(layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config

    from memeval.models import NeuronModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers)  # defaults: d_model 768, MLP 3072, vocab 50257, 12 heads
    return NeuronModel(AutoModelForCausalLM.from_config(cfg), None, f"random gpt2-small-arch ({layers} layers)")


def tiny_neox(seed: int = 0):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from memeval.models import NeuronModel

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        vocab_size=2048, max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    return NeuronModel(AutoModelForCausalLM.from_config(cfg), None, "random gpt-neox (tiny sizes: 4 layers, d 256, I 1024)")


def load_bench_model(spec: str, build: bool = False):
    """The ``--model`` spec, with memorized sequences when it is an organism; else the tiny GPT-NeoX fallback
    (also when the organism is not built yet and ``build`` is false, or for ``--model fallback``)."""
    from memeval.loading import load_model

    if spec == "fallback":
        return tiny_neox(), None
    org = None
    try:
        if spec.startswith("organism:"):
            from memeval.organisms import cache, organism, parse_organism_spec

            preset, arch, seed = parse_organism_spec(spec.partition(":")[2])
            key = organism.organism_key(organism.check(preset, arch), arch, seed)
            if not build and not cache.entry_dir(key).exists():
                raise LookupError("not built yet (pass --build to build it first)")
            org = organism.get_organism(preset, arch, seed)
            model = org.load()
        else:
            model = load_model(spec)
    except Exception as e:  # the organism package may not be ready yet
        print(f"# --model {spec}: not available ({type(e).__name__}: {str(e)[:160]}); "
              f"falling back to a random GPT-NeoX of the tiny size", flush=True)
        return tiny_neox(), None
    seqs = None
    if org is not None:
        try:
            seqs = [(list(m["input_ids"]), org.prefix_len) for m in org.memorized]
        except Exception as e:
            print(f"# organism sequences unavailable ({type(e).__name__}: {e}); using random tokens", flush=True)
    return model, seqs


def make_sequences(model, n: int, prefix: int, suffix: int, given=None, seed: int = 0):
    from memeval.api import TokenSequence

    if given:
        return [TokenSequence(f"seq{i}", tuple(ids), p) for i, (ids, p) in enumerate(given[:n])]
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = prefix + suffix - (i % 3)  # slightly different lengths, as a real batch
        out.append(TokenSequence(f"seq{i}", tuple(torch.randint(0, vocab, (length,), generator=g).tolist()), prefix))
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark


def bench_model(model, seqs, methods: list[str], classes, args, overrides: dict) -> list[dict]:
    from memeval.api import Batch

    device = model.device
    batch = Batch.from_sequences(seqs, model.pad_id, device)
    L = model.num_layers
    k = L if args.ref_layers <= 0 else min(args.ref_layers, L)
    args._ref_layers = sorted({round(i * (L - 1) / max(k - 1, 1)) for i in range(k)})
    rows = []
    fp = model.fingerprint()
    all_seqs, all_batch = seqs, batch
    for name in methods:
        seqs, batch = all_seqs, all_batch
        if name in ("zero_out", "ig") and args.slow_n_seq:
            seqs = all_seqs[: args.slow_n_seq]
            batch = Batch.from_sequences(seqs, model.pad_id, device)
        ref_name = name
        if name == "hardconcrete_same_noise":
            name = "hardconcrete"
        cls = classes[name]
        cfg = cls.Config(**overrides.get(name, {}))
        ours_cfg = replace(cfg, faithful=True) if name == "activations" else cfg
        I = model.num_neurons
        args._zero_width = I
        if name == "zero_out":  # partial runs: the same layers (and first chunks) for both, times extrapolated
            if args.ref_zero_chunks:
                args._zero_width = sum(len(c) for c in torch.arange(I).chunk(args.zero_batches)[: args.ref_zero_chunks])
            ours_cfg = replace(cfg, layers=tuple(args._ref_layers), max_neurons=args._zero_width)
        t_ours, t_ref = [], []
        ours = ref = None
        for rep in range(args.reps):
            order = ("ours", "ref") if rep % 2 == 0 else ("ref", "ours")
            for who in order:
                if who == "ours":
                    t0 = time.perf_counter()
                    ours = cls(ours_cfg).localize(model, batch)
                    t_ours.append((time.perf_counter() - t0) / len(seqs))
                else:
                    t0 = time.perf_counter()
                    ref = [run_reference(ref_name, model, torch.tensor([s.input_ids], device=device), s.prefix_len,
                                         cfg, args, s.id) for s in seqs]
                    t_ref.append((time.perf_counter() - t0) / len(seqs))
        assert model.fingerprint() == fp, f"{name} modified the model"
        scale = ours_scale = 1.0
        if name in ("zero_out", "ig"):
            scale *= L / len(args._ref_layers)
        if name == "zero_out":
            # memeval's cost per layer is linear in the layer index (blocks above it), so the spread layers
            # (which include both ends) average to the all-layer mean; per-neuron cost is constant
            scale *= I / args._zero_width
            ours_scale = scale
            ours = ours[:, :, : args._zero_width].clone()
            mask = torch.ones(L, dtype=torch.bool)
            mask[args._ref_layers] = False
            ours[:, mask] = float("nan")
        tr, to = min(t_ref) * scale, min(t_ours) * ours_scale
        rho = sum(spearman(ours[i].flatten(), ref[i].flatten()) for i in range(len(seqs))) / len(seqs)
        top = sum(topk_overlap(ours[i], ref[i]) for i in range(len(seqs))) / len(seqs)
        note = f"ref extrapolated ×{scale:.1f}" if scale != 1.0 else ""
        note += f", memeval extrapolated ×{ours_scale:.1f}" if ours_scale != 1.0 else ""
        name = ref_name
        note += f" ({len(seqs)} sequences)"
        rows.append(dict(method=name, ref=tr, ours=to, ratio=tr / to, spearman=rho, top1=top, note=note))
        print(f"  {name:13s} ref {tr:9.3f} s/seq   memeval {to:8.3f} s/seq   ×{tr / to:6.1f}   "
              f"spearman {rho:.4f}   top-1% overlap {top:.3f}  {note}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism:tiny", help="none: only the GPT-2-small-architecture model")
    ap.add_argument("--methods", default="activations,zero_out,ig,slimming,hardconcrete,hardconcrete_same_noise")
    ap.add_argument("--n-seq", type=int, default=16, help="sequences on the --model (the batch of memeval)")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--suffix", type=int, default=48)
    ap.add_argument("--gpt2-layers", type=int, default=12, help="0 skips the GPT-2-small-architecture model")
    ap.add_argument("--gpt2-n-seq", type=int, default=4)
    ap.add_argument("--gpt2-prefix", type=int, default=8)
    ap.add_argument("--gpt2-suffix", type=int, default=8)
    ap.add_argument("--gpt2-mask-steps", type=int, default=20, help="Slimming/HardConcrete max steps on GPT-2")
    ap.add_argument("--ref-layers", type=int, default=0, help="layers the IG/Zero-Out reference runs (0 = all)")
    ap.add_argument("--gpt2-ref-layers", type=int, default=2)
    ap.add_argument("--ref-zero-chunks", type=int, default=0, help="Zero-Out reference chunks per layer (0 = all)")
    ap.add_argument("--gpt2-ref-zero-chunks", type=int, default=1)
    ap.add_argument("--zero-batches", type=int, default=10, help="reference n_batches (MemPi GPT-2: 10)")
    ap.add_argument("--slow-n-seq", type=int, default=2,
                    help="sequences for Zero-Out and IG (memeval runs Zero-Out row by row, so fewer rows lose nothing)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--build", action="store_true", help="build the organism if it is not cached yet")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = import_methods()
    aliases = {"integrated_gradients": "ig"}
    methods = [aliases.get(m, m) for m in args.methods.split(",") if m]
    print(f"# machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)

    if args.model != "none":
        model, given = load_bench_model(args.model, args.build)
        seqs = make_sequences(model, args.n_seq, args.prefix, args.suffix, given)
        print(f"# model: {model.spec}: {model.num_layers} layers × {model.num_neurons} neurons; {len(seqs)} sequences "
              f"of {min(len(s.input_ids) for s in seqs)}-{max(len(s.input_ids) for s in seqs)} tokens "
              f"(prefix {seqs[0].prefix_len}); memeval batch = all of them")
        bench_model(model, seqs, methods, classes, args, {})

    if args.gpt2_layers > 0:
        model = gpt2_small(args.gpt2_layers)
        seqs = make_sequences(model, args.gpt2_n_seq, args.gpt2_prefix, args.gpt2_suffix)
        args.ref_layers, args.ref_zero_chunks = args.gpt2_ref_layers, args.gpt2_ref_zero_chunks
        steps = {"max_steps": args.gpt2_mask_steps}
        print(f"# model: {model.spec}: {model.num_layers} layers × {model.num_neurons} neurons, vocab 50257; "
              f"{len(seqs)} sequences of {min(len(s.input_ids) for s in seqs)}-{max(len(s.input_ids) for s in seqs)} "
              f"tokens (prefix {seqs[0].prefix_len}); Slimming/HardConcrete max_steps {args.gpt2_mask_steps}")
        bench_model(model, seqs, methods, classes, args, {"slimming": steps, "hardconcrete": steps})


if __name__ == "__main__":
    main()
