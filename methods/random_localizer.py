"""The ``random`` localizer: uniform random scores, the baseline every ranking needs.

Its expected recall@k equals k (the fraction of neurons selected), and zeroing its top neurons should
change nothing specific (Chang et al. 2024, Tables 2–3, "Random").
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel


def item_generator(seed: int, item_id: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, item id), so a row's draws never depend on its batchmates."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(item_id.encode())) % (2**63))
    return gen


class RandomLocalizer(Localizer):
    name = "random"
    summary = "Uniform random neuron scores, seeded per item (the chance baseline)"
    paper = "Chang, Thomason & Jia, NAACL 2024 (Random baseline)"

    @dataclass
    class Config(Localizer.Config):
        pass

    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        shape = (model.num_layers, model.num_neurons)
        rows = [torch.rand(shape, generator=item_generator(self.config.seed, item, model.device), device=model.device)
                for item in batch.item_ids]
        return torch.stack(rows)


@hookimpl
def memeval_methods():
    return [RandomLocalizer]
