"""Model organisms: small causal LMs trained by memeval on a synthetic corpus with planted memorization
(DESIGN §5). ``organism:<preset>[:<arch>][@<seed>]`` model specs resolve here.

>>> org = get_organism("tiny")            # built on first use (a few minutes on 2 cores), then cached
>>> org.memorized[0]["input_ids"], org.prefix_len
"""

from __future__ import annotations

from pathlib import Path

from memeval.loading import register_model_source
from memeval.organisms.organism import Organism, build_organism, get_organism, organism_key, remove_organism
from memeval.organisms.presets import ARCHS, DEFAULT_ARCH, PRESETS, parse_organism_spec


def resolve(rest: str) -> Path:
    """``<preset>[:<arch>][@<seed>]`` → the organism's model directory (building it if needed)."""
    preset, arch, seed = parse_organism_spec(rest)
    return get_organism(preset, arch, seed).path


register_model_source("organism", resolve)

__all__ = ["ARCHS", "DEFAULT_ARCH", "PRESETS", "Organism", "build_organism", "get_organism", "organism_key",
           "parse_organism_spec", "remove_organism", "resolve"]
