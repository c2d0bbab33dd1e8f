"""`memeval memorized extract` against a plain batch-1 `generate` loop over the same windows, same cores, one
process; and the memorized set it finds on an organism exported as a plain Hugging Face directory, against the
organism's own memorized set.

    python benchmarks/extraction.py                      # organism:tiny, 600 windows for the speed ratio
    python benchmarks/extraction.py --preset micro --windows 200

The baseline is the least a naive implementation must do: for every window, `model.generate` of ℓ greedy tokens
from its k-token prefix, one window at a time (the filters' own work is not even counted for it). memeval runs
the four filters end to end (teacher-forced pass for every window, generation only above the accuracy
threshold, batched, KV cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memeval.extraction import ExtractConfig, extract, windows  # noqa: E402
from memeval.loading import load_model  # noqa: E402
from memeval.organisms import get_organism  # noqa: E402


@torch.no_grad()
def batch1_generate(model, seqs) -> float:
    """Seconds for plain greedy `generate` of each window's suffix, one window at a time."""
    t0 = time.perf_counter()
    for s in seqs:
        prefix = torch.tensor([s.input_ids[: s.prefix_len]], device=model.device)
        n = len(s.input_ids) - s.prefix_len
        model.hf.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=model.pad_id)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--windows", type=int, default=600, help="windows timed against the batch-1 loop")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    org = get_organism(args.preset, "gpt_neox", 0)
    with tempfile.TemporaryDirectory() as tmp:
        exported = org.export(Path(tmp) / "model")
        model = load_model(str(exported))
        texts = [d["text"] for d in org.train_documents()]
        cfg = ExtractConfig(prefix_len=org.prefix_len, suffix_len=org.suffix_len)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
              f"{args.threads}; load average before: {os.getloadavg()}")
        print(f"model: exported {args.preset} organism ({model.num_layers} layers), k = {cfg.prefix_len}, "
              f"l = {cfg.suffix_len}, {len(texts)} training documents")
        # 1. speed on the same windows
        seqs, _, _ = windows(texts, model.tokenizer, replace(cfg, limit=args.windows))
        small = replace(cfg, limit=len(seqs))
        extract(model, texts, small, progress=False)  # warm-up (allocator, kernels)
        t0 = time.perf_counter()
        part = extract(model, texts, small, progress=False)
        ours = time.perf_counter() - t0
        base = batch1_generate(model, seqs)
        print(f"{len(seqs)} windows: memeval extract {ours:.2f} s ({1e3 * ours / len(seqs):.2f} ms/window), "
              f"batch-1 generate {base:.2f} s ({1e3 * base / len(seqs):.2f} ms/window): {base / ours:.1f}x "
              f"({part['report']['memorized']} memorized among them)")
        # 2. the whole training text: does it find the organism's own memorized set?
        t0 = time.perf_counter()
        full = extract(model, texts, cfg, progress=False)
        seconds = time.perf_counter() - t0
        found = {tuple(r["input_ids"]) for r in full["memorized"]}
        truth = {tuple(m["input_ids"]) for m in org.memorized}
        r = full["report"]
        print(f"all {r['measured']} distinct windows in {seconds:.1f} s: {len(found)} memorized; the organism's own "
              f"set has {len(truth)}: {len(found & truth)} found, {len(truth - found)} missed, "
              f"{len(found - truth)} others")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
