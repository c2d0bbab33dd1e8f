"""Scores against a known set (INJ's neurons, detection's memorized samples): top-k, recall, AP, ROC AUC."""

from __future__ import annotations


import torch

# ---------------------------------------------------------------------------------------------
# Localization against a known set of neurons (INJ, Chang et al. 2024 §3)


def per_layer_k(num_neurons: int, ratio: float) -> int:
    """Neurons selected per layer for a ratio: ``round(I · ratio)`` (MemPi's INJ rule), at least 1."""
    return max(1, round(num_neurons * ratio))


def per_layer_k_floor(num_neurons: int, ratio: float) -> int:
    """Neurons zeroed per layer for a ratio in DEL: ``int(I · ratio)`` (MemPi's DEL rule; may be 0). Editors
    that prune per layer use it too, so that they remove what the localizers' ablation removes."""
    return int(num_neurons * ratio)


def top_k_per_layer(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[L, I]`` mask of each layer's ``k`` highest scores (ties broken by the lower index)."""
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def top_k_global(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest scores over the flattened ``[L · I]`` grid."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(k, sorted=False).indices] = True
    return flat.view_as(scores)


def recall(selected: torch.Tensor, gold: torch.Tensor) -> float:
    """|selected ∩ gold| / |gold| over boolean masks of the same shape (Chang et al. 2024, Recall@k)."""
    return float((selected & gold).sum()) / float(gold.sum())


def per_layer_ceiling(gold: torch.Tensor, k: int) -> float:
    """The best recall any per-layer top-``k`` selection can reach: Σ_l min(k, |gold_l|) / |gold|."""
    return float(gold.sum(-1).clamp(max=k).sum()) / float(gold.sum())


def average_precision(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Average precision of the flattened scores against the gold mask (scikit-learn's definition)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(gold.flatten().cpu().numpy(), scores.flatten().float().cpu().numpy()))


def roc_auc(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Area under the ROC curve of the flattened scores against the gold mask (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(gold.flatten().cpu().numpy(), scores.flatten().float().cpu().numpy()))


