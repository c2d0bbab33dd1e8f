"""Every metric memeval reports, defined once (DESIGN §6).

Conventions: token-level tensors are aligned with ``input_ids``: entry ``[b, t]`` concerns the prediction
of token ``t`` from positions ``< t`` (entry ``t = 0`` has no prediction and is 0 / False).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Token-level quantities from one teacher-forced forward pass


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood in nats, ``[B, T]``, aligned with ``input_ids`` (0 at t = 0)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(nll, (1, 0))


def token_correct(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Whether the greedy (argmax) next-token prediction equals the true token, ``[B, T]`` bool."""
    hit = logits[:, :-1].argmax(-1) == input_ids[:, 1:]
    return F.pad(hit, (1, 0), value=False)


def greedy_tokens(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher-forced argmax prediction of each token, ``[B, T]`` (token 0 is kept as is)."""
    return torch.cat([input_ids[:, :1], logits[:, :-1].argmax(-1)], dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over ``mask``, ``[B]`` (NaN for a row with an empty mask)."""
    mask = mask.to(values.dtype) if values.is_floating_point() else mask.float()
    values = values.to(mask.dtype)
    return (values * mask).sum(-1) / mask.sum(-1)


def perplexity(mean_nll: float) -> float:
    """Perplexity = exp(mean token NLL in nats). (MemPi's code uses 2**NLL, a defect: see `faithful`.)"""
    return math.exp(mean_nll)


def perplexity_base2(mean_nll: float) -> float:
    """MemPi's reference "perplexity": 2 ** (NLL in nats). Only for ``faithful: true`` reproductions."""
    return 2.0 ** mean_nll


# ---------------------------------------------------------------------------------------------
# Strings and sequences


def levenshtein(a: str | Sequence, b: str | Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions of cost 1) between two strings or sequences."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def levenshtein_similarity(a: str | Sequence, b: str | Sequence) -> float:
    """1 − distance / max(len a, len b), in [0, 1]; 1.0 for two empty inputs."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(a, b))


def ngrams(tokens: Sequence, n: int) -> set[tuple]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def ngram_jaccard(a: Sequence, b: Sequence, n: int = 5) -> float:
    """|A ∩ B| / |A ∪ B| of the sets of n-grams of two sequences (0.0 when both are empty)."""
    ga, gb = ngrams(a, n), ngrams(b, n)
    union = ga | gb
    return len(ga & gb) / len(union) if union else 0.0


# ---------------------------------------------------------------------------------------------
# Localization against a known set of neurons (INJ, Chang et al. 2024 §3)


def per_layer_k(num_neurons: int, ratio: float) -> int:
    """Neurons selected per layer for a ratio: ``round(I · ratio)`` (MemPi's INJ rule), at least 1."""
    return max(1, round(num_neurons * ratio))


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


# ---------------------------------------------------------------------------------------------
# Aggregation


def paired_difference(a: Mapping[Any, float | None], b: Mapping[Any, float | None]) -> tuple[float, float, int]:
    """Mean ± standard error of the per-item difference a_i − b_i over the items both score (finite values).

    The paired comparison of two methods on the same items (Chang et al. 2024 compare methods with paired
    t-tests): item difficulty cancels, so two methods whose marginal error bars overlap can still be told
    apart. Returns (mean, stderr, n); (nan, nan, 0) without shared items, stderr 0 for n = 1.
    """
    shared = [k for k in a if k in b and _finite_number(a[k]) and _finite_number(b[k])]
    if not shared:
        return float("nan"), float("nan"), 0
    mean, se = mean_stderr(float(a[k]) - float(b[k]) for k in shared)
    return mean, se, len(shared)


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof = 1, over √n); stderr 0 for n < 2."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


# ---------------------------------------------------------------------------------------------
# Memorization filters (MemPi §4)
#
# The DEL benchmark keeps a sequence as "memorized" when (1) its teacher-forced suffix accuracy is above
# 0.9, (2) both the greedy and the true suffix have at least 16 distinct tokens (of 48), (3) the
# character Levenshtein distance between the decoded greedy continuation (prefix + teacher-forced
# argmax) and the reference is at most 20, and (4) among sequences whose 5-gram Jaccard similarity
# exceeds 0.05 only the lowest-distance member of each connected component survives. The thresholds of
# (2) and (3) are given for a 48-token suffix and scale linearly with the suffix length.

DEL_SUFFIX_LEN = 48
DEL_MIN_ACCURACY = 0.9
DEL_MIN_DISTINCT = 16
DEL_MAX_DISTANCE = 20


def del_thresholds(suffix_len: int = DEL_SUFFIX_LEN) -> dict[str, float]:
    """MemPi's filter thresholds scaled to ``suffix_len`` tokens: min_accuracy, min_distinct, max_distance."""
    scale = suffix_len / DEL_SUFFIX_LEN
    return {
        "min_accuracy": DEL_MIN_ACCURACY,
        "min_distinct": max(1, math.ceil(DEL_MIN_DISTINCT * scale - 1e-9)),
        "max_distance": max(0, round(DEL_MAX_DISTANCE * scale)),
    }


def distinct_count(tokens: Sequence) -> int:
    """Number of distinct tokens in a sequence."""
    return len(set(tokens))


def passes_del_filters(
    suffix_accuracy: float,
    greedy_suffix: Sequence,
    true_suffix: Sequence,
    distance: float,
    *,
    min_accuracy: float = DEL_MIN_ACCURACY,
    min_distinct: int = DEL_MIN_DISTINCT,
    max_distance: float = DEL_MAX_DISTANCE,
) -> bool:
    """Filters 1-3 of the DEL protocol for one sequence (accuracy, distinct tokens, Levenshtein)."""
    return (
        suffix_accuracy > min_accuracy
        and distinct_count(greedy_suffix) >= min_distinct
        and distinct_count(true_suffix) >= min_distinct
        and distance <= max_distance
    )


def jaccard_components(sequences: Sequence[Sequence], n: int = 5, threshold: float = 0.05) -> list[list[int]]:
    """Connected components of the graph joining two sequences whose n-gram Jaccard exceeds ``threshold``.

    Components are lists of indices in increasing order, sorted by their first index.
    """
    grams = [ngrams(s, n) for s in sequences]
    parent = list(range(len(sequences)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # candidate pairs share at least one n-gram (an inverted index avoids the all-pairs loop)
    index: dict[tuple, list[int]] = {}
    for i, g in enumerate(grams):
        for gram in g:
            index.setdefault(gram, []).append(i)
    pairs = {(a, b) for members in index.values() for ai, a in enumerate(members) for b in members[ai + 1 :]}
    for a, b in sorted(pairs):
        union = grams[a] | grams[b]
        if union and len(grams[a] & grams[b]) / len(union) > threshold:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for i in range(len(sequences)):
        comps.setdefault(find(i), []).append(i)
    return sorted(comps.values(), key=lambda c: c[0])


def dedup_lowest_distance(
    sequences: Sequence[Sequence], distances: Sequence[float], n: int = 5, threshold: float = 0.05
) -> list[int]:
    """Filter 4 of DEL: the index of the lowest-distance member of each n-gram-Jaccard component (ties:
    the lower index), in increasing order."""
    keep = [min(comp, key=lambda i: (distances[i], i)) for comp in jaccard_components(sequences, n, threshold)]
    return sorted(keep)


# ---------------------------------------------------------------------------------------------
# Editing: forgetting and collateral damage (the specificity protocol, DESIGN §6)
#
# Sources: greedy exact match and the loose (Levenshtein ≥ 0.75) match of Merullo et al. 2025
# (goodfire-ai/memorization_kfac, ``strict_acc`` / ``loose_acc``) and Sakarvadia et al. 2025 (% memorized);
# nDCG@10 drift against the unedited model from Merullo et al. 2025; the trade-off AUC is memeval's.

LOOSE_MATCH_THRESHOLD = 0.75
NDCG_K = 10


def suffix_exact_match(correct: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Whether every suffix token is the greedy prediction, ``[B]`` bool.

    ``correct`` is :func:`token_correct` of one teacher-forced pass. When all suffix tokens are the argmax
    given the true prefix, greedy decoding from the prefix reproduces the suffix exactly, so this equals
    exact match of the greedy continuation (Carlini et al. 2021's extractability; Merullo et al.'s
    ``strict_acc``) without generating. A row with an empty suffix is False.
    """
    hit = (correct | ~loss_mask).all(-1)
    return hit & loss_mask.any(-1)


def loose_match(continuation: str | Sequence, reference: str | Sequence,
                threshold: float = LOOSE_MATCH_THRESHOLD) -> bool:
    """Loose match: :func:`levenshtein_similarity` (1 − d / max length) of the greedy continuation and the
    true suffix is ≥ ``threshold`` (0.75; Merullo et al. 2025's ``loose_acc``, there 1 − d/L over 48 tokens).

    memeval compares the decoded strings (characters), so the threshold does not depend on the tokenizer.
    The continuation is the teacher-forced argmax of each suffix position (exact when greedy decoding is
    exact; after the first error it is the model's best guess given the true history).
    """
    return levenshtein_similarity(continuation, reference) >= threshold


def ndcg_at_k(ranked: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """nDCG@k of the edited model's top-k next tokens against the unedited model's top-k, per position.

    ``ranked`` and ``reference`` are ``[..., k]`` token ids, best first (``logits.topk(k).indices``).
    Merullo et al. 2025: the reference model's top-k tokens get graded relevance k, k−1, …, 1 (its rank-1
    token is worth k), every other token 0. The edited list earns DCG = Σ_{i=1..k} rel(token_i) / log2(i + 1);
    nDCG = DCG / IDCG with IDCG = Σ_{i=1..k} (k + 1 − i) / log2(i + 1), the reference's own list. Returns
    ``[...]``: 1.0 = same top-k in the same order, 0.0 = disjoint. memeval uses k = 10 (``NDCG_K``).
    """
    k = reference.shape[-1]
    relevance = torch.arange(k, 0, -1, device=reference.device, dtype=torch.float32)  # k..1
    discount = 1.0 / torch.log2(torch.arange(2, ranked.shape[-1] + 2, device=reference.device, dtype=torch.float32))
    match = ranked[..., :, None] == reference[..., None, :]  # [..., k(edited), k(reference)]
    gains = (match.float() * relevance).sum(-1)  # relevance of each edited-list token
    ideal = (relevance * discount[:k]).sum()
    return (gains * discount).sum(-1) / ideal


def relative_increase(after: float, before: float) -> float:
    """after / before − 1 (e.g. held-out perplexity: 0.1 = 10% higher than the unedited model)."""
    return after / before - 1.0


def fraction_removed(after: float, before: float) -> float:
    """(before − after) / before, the fraction of a rate removed by an edit (0 when ``before`` is 0)."""
    return (before - after) / before if before > 0 else 0.0


def forget_collateral_auc(points: Iterable[tuple[float, float]], max_collateral: float = 0.5) -> float:
    """Area under the forget-vs-collateral staircase, normalised to [0, 1] (memeval's specificity headline).

    Each point (x, y) is one budget of an editor's sweep: x = its collateral (negative values clipped to 0),
    y = fraction of the forget set's exact match removed (:func:`fraction_removed`, clipped to [0, 1]).
    The curve is

        f(x) = max { y_i : x_i ≤ x }   (0 when no tried budget has collateral ≤ x),

    the most forgetting any *tried* budget reached with at most x collateral: a step function, flat between
    measured points, since a budget that was not tried is not assumed to exist. The headline is
    ∫₀^B f(x) dx / B with B = ``max_collateral`` (default 0.5). 1.0 = the whole forget set forgotten at no
    collateral; 0.0 = nothing forgotten within the bound. Examples: points (0.1, 0.5), (0.3, 1.0) with
    bound 1: 0.2·0.5 + 0.7·1 = 0.8; one point (0.4, 1.0) with bound 0.5: 0.1·1 / 0.5 = 0.2; one point
    (0.6, 1.0) with bound 0.5: 0 (nothing was measured inside the bound).
    """
    pts = sorted((max(0.0, float(x)), min(1.0, max(0.0, float(y)))) for x, y in points)
    area, best = 0.0, 0.0
    edges = [x for x, _ in pts if x < max_collateral] + [max_collateral]
    for (x, y), next_x in zip(pts, edges[1:]):
        best = max(best, y)
        area += (next_x - x) * best
    return area / max_collateral


# ---------------------------------------------------------------------------------------------
# A-priori memorization detection (Dentan et al., ECAI 2025; Carlini et al., S&P 2022)
#
# Ground truth: the local log-LiRA score of each training sample of a target classifier, on the logit gap,
# against shadow models that did (IN) and did not (OUT) train on it; memorized when it is at least η.
# A detector's risk scores are then judged as a ranking of the memorized samples: ROC AUC (the primary,
# :func:`roc_auc`), FPR at TPR = 0.75 (the paper's v1 metric), TPR at FPR = 1 % and precision@k.


def logit_gap(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """g = z_y − max_{y'≠y} z_{y'} per row of class logits ``[N, C]`` with labels ``[N]`` (the margin of
    the trained label; negative when another class wins). Dentan et al. §3, the LiRA "hinge" statistic."""
    z = logits.float()
    own = z.gather(1, labels.view(-1, 1)).squeeze(1)
    others = z.scatter(1, labels.view(-1, 1), float("-inf"))
    return own - others.max(dim=1).values


def gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²), elementwise."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


LIRA_CLIP = 100.0
LIRA_MIN_STD = 1e-3


def local_lira(target: torch.Tensor, shadows: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per-sample local log-LiRA (Carlini et al. 2022 online LiRA; Dentan et al. §3 "memo").

    ``target [N]`` is the statistic (logit gap) of each sample on the target model, ``shadows [K, N]`` on
    K shadow models and ``member [K, N]`` whether shadow k trained on sample n. For each sample a Gaussian
    is fitted to its IN values and one to its OUT values (mean, sample std with ddof = 1, floored at
    ``LIRA_MIN_STD``); the score is log N(target; μ_in, σ_in) − log N(target; μ_out, σ_out), clipped to
    ±``LIRA_CLIP`` as the paper's analysis does. A sample with fewer than 2 IN or 2 OUT values gets NaN.
    """
    shadows, member = shadows.double(), member.bool()
    x = target.double()

    def fit(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = mask.sum(0)
        mean = (shadows * mask).sum(0) / n.clamp_min(1)
        var = (((shadows - mean) ** 2) * mask).sum(0) / (n - 1).clamp_min(1)
        return mean, var.sqrt().clamp_min(LIRA_MIN_STD), n

    mu_in, sd_in, n_in = fit(member)
    mu_out, sd_out, n_out = fit(~member)
    score = (gaussian_logpdf(x, mu_in, sd_in) - gaussian_logpdf(x, mu_out, sd_out)).clamp(-LIRA_CLIP, LIRA_CLIP)
    return torch.where((n_in >= 2) & (n_out >= 2), score, torch.full_like(score, float("nan")))


def _roc(scores: torch.Tensor, gold: torch.Tensor):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(gold.flatten().cpu().numpy().astype(bool), scores.flatten().double().cpu().numpy())
    return fpr, tpr


def fpr_at_tpr(scores: torch.Tensor, gold: torch.Tensor, tpr: float = 0.75) -> float:
    """The lowest false-positive rate of any threshold on ``scores`` whose true-positive rate is at least
    ``tpr`` (ROC operating points, no interpolation; tied scores share one threshold). Dentan et al. v1."""
    f, t = _roc(scores, gold)
    return float(f[t >= tpr - 1e-12].min())


def tpr_at_fpr(scores: torch.Tensor, gold: torch.Tensor, fpr: float = 0.01) -> float:
    """The highest true-positive rate of any threshold on ``scores`` whose false-positive rate is at most
    ``fpr`` (ROC operating points, no interpolation). Carlini et al. 2022's low-FPR metric."""
    f, t = _roc(scores, gold)
    return float(t[f <= fpr + 1e-12].max())


def precision_at_k(scores: torch.Tensor, gold: torch.Tensor, k: int) -> float:
    """Fraction of gold items among the ``k`` highest scores, ties at the cut resolved in expectation
    (a tied group straddling the cut contributes its gold fraction times the places left), so a constant
    score gets the base rate."""
    s, g = scores.flatten().double().cpu(), gold.flatten().bool().cpu()
    k = max(1, min(int(k), s.numel()))
    cut = torch.sort(s, descending=True).values[k - 1]
    above, tied = s > cut, s == cut
    places = k - int(above.sum())
    hits = float(g[above].sum()) + places * float(g[tied].double().mean())
    return hits / k
