"""Ranking metrics shared by retrieval and zero-shot classification: recall@K with its chance level,
top-K accuracy and mean per-class accuracy. Scores are (queries, candidates) arrays; higher is better."""
import math

import numpy as np


def first_positive_rank(scores, positives):
    """0-based rank of the best-ranked positive candidate of each query.
    ``positives[q]``: the candidate indices that are right answers for query q (at least one).
    A NaN score ranks last (a diverged model must not look perfect: NaN compares false to everything)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    ranks = np.empty(len(scores), dtype=np.int64)
    for q, row in enumerate(scores):
        if not len(positives[q]):
            raise ValueError(f"query {q} has no positive candidate")
        is_positive = np.zeros(len(row), dtype=bool)
        is_positive[list(positives[q])] = True
        # Ties count against the query: a model that scores everything alike ranks at chance or worse.
        ranks[q] = int((row[~is_positive] >= row[is_positive].max()).sum())
    return ranks


def recall_at_k(scores, positives, ks=(1, 5, 10)):
    """{K: share of queries with a positive among the K best-scored candidates}."""
    ranks = first_positive_rank(scores, positives)
    return {k: float((ranks < k).mean()) for k in ks}


def chance_recall_at_k(num_candidates, positives, ks=(1, 5, 10)):
    """Expected recall@K of a uniformly random ranking: 1 - C(N - c, K) / C(N, K) per query with c
    positives among N candidates, averaged over queries."""
    n = num_candidates
    out = {}
    for k in ks:
        misses = [math.comb(n - len(p), k) / math.comb(n, k) if k <= n else 0.0 for p in positives]
        out[k] = float(1.0 - np.mean(misses))
    return out


def topk_accuracy(topk_predictions, labels, k):
    """Share of samples whose label is among their first k predictions."""
    return float(np.mean([label in list(preds)[:k] for preds, label in zip(topk_predictions, labels)]))


def mean_per_class_accuracy(predictions, labels):
    """Top-1 accuracy per class present in ``labels``, averaged over those classes."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float(np.mean([(predictions[labels == c] == c).mean() for c in np.unique(labels)]))
