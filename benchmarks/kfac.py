"""K-FAC curvature editing: seconds and peak memory of factor collection, eigendecomposition and the edit.

Measured on (1) the tiny organism (``organism:tiny``, built by ``memeval organism build tiny``) and (2)
random GPT-2-architecture models (12 heads, MLP 4×d, vocab 50257) at several widths up to GPT-2 small
(d = 768). Every configuration runs in a fresh subprocess so that ``ru_maxrss`` is its own peak resident
memory; times are wall-clock seconds with ``--threads`` torch threads.

    python benchmarks/kfac.py                       # organism + widths 192, 384, 768 (2 layers edited)
    python benchmarks/kfac.py --widths 768 --layers 12 --sequences 32

Columns: collect = one forward+backward pass over the text with hooks accumulating A and G for every
targeted MLP matrix; eigh = the two eigendecompositions per matrix; edit = threshold selection and
W' = U_G[(U_Gᵀ W U_A) ⊙ M]U_Aᵀ for every matrix at ρ = 0.8 (plus the model copy); peak_rss_mb = the
process's peak resident set (model, factors and eigenvectors included); base_rss_mb = after loading.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from memeval.api import SequenceSet, TokenSequence
    from memeval.loading import load_model
    from memeval.models import NeuronModel, set_weight_out_in, weight_out_in
    from memeval_methods._editing import mlp_matrices
    from memeval_methods.kfac_curvature import collect_factors, eigh_desc, kfac_edit_weight

    if args.model == "organism":
        from memeval.organisms import get_organism

        org = get_organism("tiny")
        model = load_model(str(org.path))
        docs = [d["text"] for d in org.train_documents() if not d.get("planted_id")][: args.sequences]
        seqs = [TokenSequence(f"d{i}", tuple(model.tokenizer(t)["input_ids"][: args.tokens]), 0)
                for i, t in enumerate(docs)]
        seqs = [s for s in seqs if len(s.input_ids) > 1]
    else:
        import transformers as tf

        d = int(args.model.split(":")[1])
        cfg = tf.GPT2Config(n_layer=12, n_embd=d, n_head=12, n_inner=4 * d, n_positions=1024, vocab_size=50257)
        torch.manual_seed(0)
        hf = tf.GPT2LMHeadModel(cfg)

        class Tok:
            pad_token_id = eos_token_id = bos_token_id = 50256

        model = NeuronModel(hf, Tok(), f"gpt2-random-d{d}")
        gen = torch.Generator().manual_seed(0)
        seqs = [TokenSequence(f"r{i}", tuple(torch.randint(0, 50257, (args.tokens,), generator=gen).tolist()), 0)
                for i in range(args.sequences)]
    text = SequenceSet(seqs, model.pad_id)
    layers = list(range(model.num_layers))[: args.layers] if args.layers else list(range(model.num_layers))
    base = rss_mb()
    t0 = time.perf_counter()
    fac = collect_factors(model, text, layers, ["all"], batch_size=args.batch_size)
    t1 = time.perf_counter()
    eig = {k: {"G": eigh_desc(f["G"]), "A": eigh_desc(f["A"])} for k, f in fac.items()}
    t2 = time.perf_counter()
    edited = model.clone()
    for l in layers:
        for name, module in mlp_matrices(edited, l).items():
            e = eig[f"{l}.{name}"]
            new, _ = kfac_edit_weight(weight_out_in(module).detach(), e["G"], e["A"], 0.8)
            set_weight_out_in(module, new)
    t3 = time.perf_counter()
    return {"model": args.model, "d_model": model.hidden_size, "neurons": model.num_neurons,
            "layers_edited": len(layers), "matrices": len(fac), "tokens": int(next(iter(fac.values()))["tokens"]),
            "collect_s": round(t1 - t0, 2), "eigh_s": round(t2 - t1, 2), "edit_s": round(t3 - t2, 2),
            "base_rss_mb": round(base), "peak_rss_mb": round(rss_mb()), "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="192,384,768")
    ap.add_argument("--layers", type=int, default=2, help="GPT-2 models: layers edited (0 = all)")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-organism", action="store_true")
    ap.add_argument("--model", help=argparse.SUPPRESS)  # internal: one configuration in this process
    args = ap.parse_args()
    if args.model:
        print(json.dumps(one(args)))
        return
    runs = ([] if args.no_organism else [("organism", 0)]) + [(f"gpt2:{w}", args.layers) for w in args.widths.split(",") if w]
    rows = []
    for model, layers in runs:
        cmd = [sys.executable, __file__, "--model", model, "--layers", str(layers), "--sequences", str(args.sequences),
               "--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    keys = ["model", "d_model", "neurons", "layers_edited", "matrices", "tokens", "collect_s", "eigh_s", "edit_s",
            "base_rss_mb", "peak_rss_mb"]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
