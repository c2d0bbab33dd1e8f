"""HardConcrete (L0 / hard-concrete gates; Louizos et al. 2018), as used by Chang, Thomason & Jia (2024) §3.

One logit ``score`` per neuron and sequence, initialised at logit((p_init + 0.1) / 1.2). Training gate:
u ~ U(1e-4, 1 − 1e-4), s = σ((log u − log(1 − u) + score) / β), stretched to (−0.1, 1.1) and clamped to [0, 1];
it multiplies the neuron (the down-projection input) at every position. Regulariser = expected L0 fraction,
mean_i σ(score_i − β log(0.1 / 1.1)) over the masked layers. Loss = ℓ_mem + λ · reg, Adam on the logits; every
10 steps a row stops once reg < ``stop_loss``. Attribution = σ(score).

Batched: logits ``[B, L, I]``; the noise of a row is drawn from its own generator seeded from (seed, item id),
so a row's result does not depend on its batchmates; a finished row leaves the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel
from memeval_methods._common import masked_layers, optimise_masks, row_generator, suffix_nll

LEFT, RIGHT = -0.1, 1.1  # the stretch interval of the hard-concrete distribution


class HardConcrete(Localizer):
    name = "hardconcrete"
    summary = "Stochastic hard-concrete neuron gates with an expected-L0 penalty, trained to keep the suffix likely"
    paper = "Chang, Thomason & Jia 2024 (NAACL), §3; Louizos et al. 2018"
    per_row_weights = True  # forwards its active rows inside model.rows(rows)

    @dataclass
    class Config(Localizer.Config):
        # Defaults: MemPi DEL Pythia-6.9B (script/pile/HC.sh): lr 1e-3, λ 2000, p_init 0.9, β 0.33, 200 steps,
        # stop 0.4.
        lr: float = 1e-3
        lambda_l0: float = 2000.0
        p_init: float = 0.9
        beta: float = 0.33
        max_steps: int = 200
        stop_loss: float = 0.4
        check_every: int = 10
        skip_layers: tuple[int, ...] = ()  # layers left ungated (score σ(init))

    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        cfg = self.config
        layers = masked_layers(model, cfg.skip_layers)
        B, L, I, dev = len(batch), len(layers), model.num_neurons, model.device
        p = (cfg.p_init - LEFT) / (RIGHT - LEFT)
        init_logit = math.log(p / (1 - p))
        init = torch.full((B, L, I), init_logit, device=dev, dtype=torch.float32)
        gens = [row_generator(model, cfg.seed, item) for item in batch.item_ids]
        shift = cfg.beta * math.log(-LEFT / RIGHT)

        def loss_fn(scores: torch.Tensor, sub: Batch, rows: torch.Tensor):
            u = torch.stack([torch.rand((L, I), generator=gens[r], device=dev) for r in rows.tolist()])
            u = u.clamp(0.0001, 0.9999)
            s = torch.sigmoid((u.log() - (1 - u).log() + scores) / cfg.beta)
            gate = (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)

            def apply(j: int):
                return lambda h: h * gate[:, j].to(h.dtype)[:, None, :]

            with model.rows(rows), model.intervene({l: apply(j) for j, l in enumerate(layers)}):
                lm = suffix_nll(model, sub)
            reg = torch.sigmoid(scores - shift).mean(dim=(1, 2))
            return lm, reg

        final = optimise_masks(init, batch, loss_fn, lr=cfg.lr, lam=cfg.lambda_l0, max_steps=cfg.max_steps,
                               stop_loss=cfg.stop_loss, check_every=cfg.check_every)
        out = torch.full((B, model.num_layers, I), init_logit, device=dev, dtype=torch.float32)
        out[:, layers] = final
        return torch.sigmoid(out)


@hookimpl
def memeval_methods():
    return [HardConcrete]
