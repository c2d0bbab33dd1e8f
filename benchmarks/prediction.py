"""Memorization prediction: what the ground truth costs, against plain batch-1 greedy generation.

    python benchmarks/prediction.py                                   # memo_prediction_organism's sequences
    python benchmarks/prediction.py --task memo_prediction_organism --batch-size 32 --limit 200

The prediction protocol's ground truth is each sequence's greedy match vector m_i = 1[greedy token i = true
token i] (Chen, Han & Miyao 2024; Biderman et al. 2023). memeval computes it with
:func:`memeval.generation.greedy_match`: one teacher-forced pass gives the matches up to the first mismatch,
and only the tail after it is generated, batched. The reference code generates every sequence (``generate``
with ``min_length = max_length = k + ℓ``). This script times, on the task's own sequences and model:

- ``plain batch-1``: greedy generation of ℓ tokens for every sequence, one at a time (KV cache; the same
  decoding loop as memeval's, which tests/test_generation.py proves equal to transformers' ``generate``);
- ``plain batched``: the same generation, ``--batch-size`` sequences at a time (left-padded);
- ``shortcut``: ``greedy_match``, as the protocol runs it;

and checks that the three give the same match vectors. Every line carries the load average (the machine
may be shared). Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from memeval.generation import greedy_continuations, greedy_match
from memeval.plugins import get_registry
from memeval.protocols.prediction import PredictionProtocol
from memeval.tasks import load_tasks


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="memo_prediction_organism")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="time only the first N sequences")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    task = load_tasks(registry=get_registry()).tasks[args.task]
    model = PredictionProtocol.load_model(task, "cpu", torch.float32)
    proto = PredictionProtocol(task, model, task.seed)
    seqs = proto._sequences()[: args.limit]
    ell = len(seqs[0].input_ids) - seqs[0].prefix_len
    prompts = [list(s.input_ids[: s.prefix_len]) for s in seqs]
    print(f"{args.task}: {len(seqs)} sequences, k = {seqs[0].prefix_len}, l = {ell}, model {task.model}; "
          f"{torch.get_num_threads()} threads; {load()}")

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    with torch.no_grad():
        shortcut, t_short = timed(lambda: greedy_match(model, seqs, args.batch_size))
        batched, t_batched = timed(lambda: greedy_continuations(model, prompts, ell, batch_size=args.batch_size))
        single, t_single = timed(lambda: greedy_continuations(model, prompts, ell, batch_size=1))

    def matches(conts):
        return [[a == b for a, b in zip(c, s.input_ids[s.prefix_len:])] for c, s in zip(conts, seqs)]

    short_m = [list(m.matches) for m in shortcut]
    agree_single = sum(a == b for a, b in zip(short_m, matches(single))) / len(seqs)
    agree_batched = sum(a == b for a, b in zip(short_m, matches(batched))) / len(seqs)
    no_tail = sum(m.exact for m in shortcut) / len(seqs)
    mean_first = sum(m.first_mismatch for m in shortcut) / len(seqs)
    for name, t in (("plain batch-1", t_single), (f"plain batched ({args.batch_size})", t_batched),
                    (f"shortcut ({args.batch_size})", t_short)):
        print(f"{name:>22}: {t:7.2f} s  {len(seqs) / t:8.1f} sequences/s  {t_single / t:6.1f}x batch-1")
    print(f"agreement with the shortcut: batch-1 {agree_single:.4f}, batched {agree_batched:.4f} (fraction of "
          f"sequences with identical match vectors); exact matches {no_tail:.3f} (no generation), mean first "
          f"mismatch at token {mean_first:.1f} of {ell}; {load()}")
    print(json.dumps({"task": args.task, "sequences": len(seqs), "k": seqs[0].prefix_len, "l": ell,
                      "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "seconds": {"plain_batch1": round(t_single, 3), "plain_batched": round(t_batched, 3),
                                  "shortcut": round(t_short, 3)},
                      "speedup_vs_batch1": round(t_single / t_short, 2),
                      "agreement": {"batch1": agree_single, "batched": agree_batched},
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
