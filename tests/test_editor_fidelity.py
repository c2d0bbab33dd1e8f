"""Editors against their reference code: BalancedSubnet's score initialisation and fp32 master weights for the
training-based editors under bf16 (issue #12 item 8)."""

from __future__ import annotations

import torch


def test_balanced_subnet_scores_start_as_the_reference_kaiming_uniform():
    """The reference initialises each score tensor with ``kaiming_uniform_(a=√5)``: bound 1/√shape[1]
    (memeval used √(6/fan_in), 2.4 times wider)."""
    import math

    from memeval_methods.balanced_subnet import initial_scores

    shape = torch.Size([64, 400])
    got = initial_scores(shape, torch.Generator().manual_seed(5))
    want = torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=torch.Generator().manual_seed(5))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got.abs().max() <= 1 / math.sqrt(400) and got.abs().max() > 0.99 / math.sqrt(400)


def test_unlearning_in_bf16_keeps_fp32_master_weights():
    """Adam steps of 1e-4 on bf16 weights round to nothing for most of them; with fp32 masters the bf16 edit
    tracks the fp32 edit. Plain bf16 Adam (the behaviour before) ends much farther from it."""
    from memeval_methods._editing import MasterAdam

    torch.manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(256, 64) * 0.02)
    target = torch.randn(256, 64) * 0.02

    def run(param: torch.nn.Parameter, opt_step, steps: int = 20) -> torch.Tensor:
        for _ in range(steps):
            loss = ((param.float() - target) ** 2).sum()
            param.grad = None
            loss.backward()
            opt_step()
        return param.detach().float()

    ref = torch.nn.Parameter(w32.detach().clone())
    ref_opt = torch.optim.Adam([ref], lr=1e-4)
    reference = run(ref, ref_opt.step)
    master = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    m_opt = MasterAdam([master], lr=1e-4)
    with_masters = run(master, m_opt.step)
    plain = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    p_opt = torch.optim.Adam([plain], lr=1e-4)
    without = run(plain, p_opt.step)
    start = w32.detach().to(torch.bfloat16).float()
    assert (without == start).float().mean() > 0.05  # plain bf16 Adam leaves weights stuck
    assert (with_masters - reference).norm() < 0.5 * (without - reference).norm()
    assert master.dtype == torch.bfloat16
