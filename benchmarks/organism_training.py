"""Training throughput of the organism presets against a plain matmul baseline on the same cores.

For each preset (micro, tiny, small: a few steps each) and architecture, runs the real training loop
(`memeval.organisms.train.train`) on random chunks and reports tokens/s and the model FLOP/s
(≈ 6 · params · tokens/s, attention ignored), next to the FLOP/s of a plain fp32 matmul shaped like the
model's MLP up-projection for one batch ([batch·context, d] @ [d, 4d]), measured in the same run.

    python benchmarks/organism_training.py [--presets micro,tiny,small] [--archs gpt_neox,gpt2,llama]
                                           [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch


def matmul_flops(m: int, k: int, n: int, seconds: float = 1.5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start)


def bench(preset_name: str, arch: str, steps: int, batch_size: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    from memeval.organisms.presets import PRESETS, model_config
    from memeval.organisms.train import train

    p = PRESETS[preset_name]
    p = dataclasses.replace(p, steps=steps, checkpoint_fractions=(), batch_size=batch_size or p.batch_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(p, arch, p.vocab_size, 0, 1))
    params = sum(x.numel() for x in model.parameters())
    chunks = torch.randint(2, p.vocab_size, (max(64, p.batch_size * 4), p.context))
    # two warm-up steps, not timed
    train(model, chunks, dataclasses.replace(p, steps=2), 0)
    stats = train(model, chunks, p, 0)
    tps = stats.tokens_per_second
    mm = matmul_flops(p.batch_size * p.context, p.d_model, p.mlp_ratio * p.d_model)
    return {"preset": preset_name, "arch": arch, "params": params, "steps": steps, "tokens_per_s": tps,
            "model_flops": 6 * params * tps, "matmul_flops": mm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="micro,tiny,small")
    ap.add_argument("--archs", default="gpt_neox,gpt2,llama")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: 40 micro, 20 tiny, 2 small)")
    ap.add_argument("--small-batch", type=int, default=1,
                    help="batch size for the small preset on CPU (its real batch, 32 x 512 tokens, takes minutes a step)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all available cores)")
    args = ap.parse_args()

    from memeval.organisms.train import available_cores

    torch.set_num_threads(args.threads or available_cores())
    default_steps = {"micro": 40, "tiny": 20, "small": 2}
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'preset':<7} {'arch':<9} {'params':>10} {'steps':>5} {'tokens/s':>10} {'model GFLOP/s':>14} "
          f"{'matmul GFLOP/s':>15} {'ratio':>6}")
    for preset in args.presets.split(","):
        for arch in args.archs.split(","):
            r = bench(preset, arch, args.steps or default_steps.get(preset, 10),
                      args.small_batch if preset == "small" else 0)
            print(f"{r['preset']:<7} {r['arch']:<9} {r['params']:>10,} {r['steps']:>5} {r['tokens_per_s']:>10,.0f} "
                  f"{r['model_flops'] / 1e9:>14.1f} {r['matmul_flops'] / 1e9:>15.1f} "
                  f"{r['model_flops'] / r['matmul_flops']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
