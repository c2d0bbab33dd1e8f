"""Functions behind ``memeval organism build|info|export`` (argument parsing lives in ``memeval.cli``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memeval.organisms.organism import get_organism
from memeval.organisms.presets import check

SUMMARY_KEYS = ("memorized", "memorized_by_duplication", "heldout_ppl", "unigram_ppl", "fact_accuracy",
                "fact_chance", "arithmetic_accuracy", "arithmetic_chance", "params", "train_tokens",
                "tokens_per_second", "seconds")


def build_command(preset: str, arch: str = "gpt_neox", seed: int = 0) -> int:
    """Build (or find in the cache) an organism and print where it is and its headline numbers."""
    check(preset, arch)
    org = get_organism(preset, arch, seed)
    i = org.info
    print(f"organism {preset}:{arch}@{seed}: {org.path}")
    print(f"  {i['params'] / 1e6:.2f}M params, {i['train_tokens']:,} training tokens "
          f"({i['tokens_per_second']:,.0f} tok/s), built in {i['seconds']:.0f} s")
    print(f"  memorized {i['memorized']} of {i['planted']} planted; by duplication: "
          + ", ".join(f"{d}x:{n}" for d, n in i["memorized_by_duplication"].items()))
    print(f"  held-out ppl {i['heldout_ppl']:.2f} (unigram {i['unigram_ppl']:.1f}); "
          f"facts {i['fact_accuracy']:.1%} (chance {i['fact_chance']:.1%}); "
          f"arithmetic {i['arithmetic_accuracy']:.1%} (chance {i['arithmetic_chance']:.1%})")
    print(f"  plot: {org.path / 'memorization.png'}")
    return 0


def info_command(preset: str, arch: str = "gpt_neox", seed: int = 0, as_json: bool = False) -> int:
    """Print an organism's measurements (building it first if it is not cached)."""
    check(preset, arch)
    org = get_organism(preset, arch, seed)
    info = {k: v for k, v in org.info.items() if k != "preset_config"}
    info["path"] = str(org.path)
    if as_json:
        json.dump(info, sys.stdout, indent=1)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"organism {preset}:{arch}@{seed}", show_header=False)
    for k, v in info.items():
        if k in ("checkpoints", "versions", "filters"):
            v = json.dumps(v)
        elif isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}: {b:.3g}" if isinstance(b, float) else f"{a}: {b}" for a, b in v.items())
        table.add_row(k, str(v))
    Console().print(table)
    return 0


def export_command(preset: str, arch: str, seed: int, out: Path) -> int:
    """Export an organism as a plain Hugging Face directory with its training texts."""
    check(preset, arch)
    org = get_organism(preset, arch, seed)
    org.export(out)
    print(f"organism {preset}:{arch}@{seed} exported to {out}: model + tokenizer, train.jsonl "
          f"({org.manifest['documents']} documents), organism_memorized.jsonl ({len(org.memorized)} sequences, "
          f"prefix {org.prefix_len} + suffix {org.suffix_len} tokens)")
    return 0
