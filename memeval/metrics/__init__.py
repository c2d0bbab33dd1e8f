"""Every metric memeval reports, defined once (DESIGN §6), one module per concern:

- :mod:`~memeval.metrics.sequences`: token-level quantities from one teacher-forced pass (NLL, greedy
  correctness), perplexity, Levenshtein and n-gram distances;
- :mod:`~memeval.metrics.ranking`: scores against a known set (INJ's injected neurons, detection's memorized
  samples): per-layer top-k, recall, ceiling, average precision, ROC AUC;
- :mod:`~memeval.metrics.aggregation`: means, standard errors, paired differences over items;
- :mod:`~memeval.metrics.filters`: MemPi's DEL filters (which sequences count as memorized);
- :mod:`~memeval.metrics.editing`: forgetting and collateral of an edit (specificity);
- :mod:`~memeval.metrics.detection`: LiRA ground truth and detector operating points;
- :mod:`~memeval.metrics.prediction`: predicted greedy match vectors against true ones (prediction tasks).

Every name is importable from ``memeval.metrics`` itself.

Conventions: token-level tensors are aligned with ``input_ids``: entry ``[b, t]`` concerns the prediction
of token ``t`` from positions ``< t`` (entry ``t = 0`` has no prediction and is 0 / False).
"""

from __future__ import annotations

from memeval.metrics.sequences import (
    token_nll,
    token_correct,
    greedy_tokens,
    masked_mean,
    perplexity,
    mempi_perplexity,
    levenshtein,
    levenshtein_similarity,
    ngrams,
    ngram_jaccard,
)
from memeval.metrics.ranking import (
    per_layer_k,
    per_layer_k_floor,
    top_k_per_layer,
    top_k_global,
    recall,
    per_layer_ceiling,
    average_precision,
    roc_auc,
)
from memeval.metrics.aggregation import paired_difference, mean_stderr
from memeval.metrics.filters import (
    del_thresholds,
    distinct_count,
    passes_del_filters,
    jaccard_components,
    dedup_lowest_distance,
    DEL_SUFFIX_LEN,
    DEL_MIN_ACCURACY,
    DEL_MIN_DISTINCT,
    DEL_MAX_DISTANCE,
)
from memeval.metrics.editing import (
    suffix_exact_match,
    loose_match,
    ndcg_at_k,
    relative_increase,
    fraction_removed,
    forget_collateral_auc,
    forget_collateral_frontier,
    LOOSE_MATCH_THRESHOLD,
    NDCG_K,
)
from memeval.metrics.prediction import (
    exact_auc,
    forecast_precision_recall,
    full_accuracy,
    full_accuracy_by_bin,
    majority_token_accuracy,
    memorized_f1,
    predicted_m_by_bin,
    score_bins,
    token_accuracy,
    token_auc,
)
from memeval.metrics.detection import (
    logit_gap,
    gaussian_logpdf,
    local_lira,
    fpr_at_tpr,
    tpr_at_fpr,
    precision_at_k,
    LIRA_CLIP,
    LIRA_MIN_STD,
)

__all__ = [
    "exact_auc",
    "forecast_precision_recall",
    "full_accuracy",
    "full_accuracy_by_bin",
    "majority_token_accuracy",
    "memorized_f1",
    "predicted_m_by_bin",
    "score_bins",
    "token_accuracy",
    "token_auc",
    "token_nll",
    "token_correct",
    "greedy_tokens",
    "masked_mean",
    "perplexity",
    "mempi_perplexity",
    "levenshtein",
    "levenshtein_similarity",
    "ngrams",
    "ngram_jaccard",
    "per_layer_k",
    "per_layer_k_floor",
    "top_k_per_layer",
    "top_k_global",
    "recall",
    "per_layer_ceiling",
    "average_precision",
    "roc_auc",
    "paired_difference",
    "mean_stderr",
    "del_thresholds",
    "distinct_count",
    "passes_del_filters",
    "jaccard_components",
    "dedup_lowest_distance",
    "DEL_SUFFIX_LEN",
    "DEL_MIN_ACCURACY",
    "DEL_MIN_DISTINCT",
    "DEL_MAX_DISTANCE",
    "suffix_exact_match",
    "loose_match",
    "ndcg_at_k",
    "relative_increase",
    "fraction_removed",
    "forget_collateral_auc",
    "forget_collateral_frontier",
    "LOOSE_MATCH_THRESHOLD",
    "NDCG_K",
    "logit_gap",
    "gaussian_logpdf",
    "local_lira",
    "fpr_at_tpr",
    "tpr_at_fpr",
    "precision_at_k",
    "LIRA_CLIP",
    "LIRA_MIN_STD",
]
