"""hiad_pl.metrics.curves against scikit-learn: exact curves, binned counts, weights, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from hiad_pl.metrics import curves


def _data(seed: int, n: int = 500, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    target = (rng.random(n) < 0.3).astype(np.int64)
    scores = rng.normal(size=n) + target
    if ties:
        scores = np.round(scores, 1)
    return torch.from_numpy(scores), torch.from_numpy(target)


@pytest.mark.parametrize("ties", [False, True])
def test_exact_curves_equal_sklearn(ties: bool) -> None:
    scores, target = _data(0, ties=ties)
    fpr, tpr, thresholds = curves.roc_from_scores(scores, target)
    assert curves.area(fpr, tpr) == pytest.approx(roc_auc_score(target, scores), abs=1e-12)
    ref_fpr, ref_tpr, _ = roc_curve(target, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr, atol=1e-12)
    assert float(thresholds[0]) > float(scores.max())  # the (0, 0) point lies above every score
    precision, recall, pr_thresholds = curves.pr_from_scores(scores, target)
    assert curves.average_precision(precision, recall) == pytest.approx(average_precision_score(target, scores), abs=1e-12)
    ref_p, ref_r, ref_t = precision_recall_curve(target, scores)
    # scikit-learn keeps the thresholds below full recall; ours stop at the first that reaches it
    start = len(ref_t) - len(pr_thresholds)
    np.testing.assert_allclose(precision.numpy(), ref_p[start:], atol=1e-12)
    np.testing.assert_allclose(recall.numpy(), ref_r[start:], atol=1e-12)
    np.testing.assert_allclose(pr_thresholds.numpy(), ref_t[start:])


def test_weighted_counts_equal_weighted_cumulative_sums() -> None:
    scores, target = _data(1, n=60, ties=True)
    weights = torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fps, tps, thresholds = curves.cumulative_counts(scores, target, weights)
    for fp, tp, threshold in zip(fps, tps, thresholds):
        above = scores >= threshold
        assert float(tp) == pytest.approx(float((weights * target)[above].sum()))
        assert float(fp) == pytest.approx(float((weights * (1 - target))[above].sum()))
    assert bool((thresholds[1:] < thresholds[:-1]).all())


def test_binned_curves_match_the_exact_ones_at_the_bin_thresholds() -> None:
    scores, target = _data(3, n=2000)
    thresholds = torch.quantile(scores, torch.linspace(0, 1, 101, dtype=torch.float64))
    predicted = scores[None, :] >= thresholds[:, None]
    positive = target.bool()[None, :]
    confusion = torch.stack([
        torch.stack([(~predicted & ~positive).sum(1), (predicted & ~positive).sum(1)], 1),
        torch.stack([(~predicted & positive).sum(1), (predicted & positive).sum(1)], 1),
    ], 1)
    fpr, tpr = curves.roc_from_counts(confusion)
    assert bool((fpr[1:] >= fpr[:-1]).all())
    assert curves.area(fpr, tpr) == pytest.approx(roc_auc_score(target, scores), abs=5e-3)
    precision, recall = curves.pr_from_counts(confusion)
    assert curves.average_precision(precision, recall) == pytest.approx(average_precision_score(target, scores), abs=2e-2)
    # a threshold above every score predicts nothing: precision 1 by convention, recall 0
    empty = torch.tensor([[[10, 0], [5, 0]]])
    p, r = curves.pr_from_counts(empty)
    assert p.tolist() == [1.0, 1.0] and r.tolist() == [0.0, 0.0]
