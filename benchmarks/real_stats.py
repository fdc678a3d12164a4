"""Statistics that can decide: per-image sufficient statistics, bootstrap intervals, paired comparisons.

A test set's results are kept as per-image statistics on one grid of score
thresholds, so that every metric can be recomputed for any resample of the
images in a few matrix products:

- the image score and label of each image;
- per image, the number of normal pixels and of defect pixels in each score bin
  (pixel AUROC, pixel AP, F1-max);
- per connected defect region (8-connectivity), the number of its pixels in
  each bin (the per-region overlap of AUPRO).

The bins are the run's own: quantiles of all its pixel scores (``BINS`` of
them, so ties and float noise do not matter); a threshold ``t_k`` flags the
pixels whose score is at least the ``k``-th edge. With a few thousand bins the
binned AUROC / AUPRO agree with the exact ones to about 1e-4.

Intervals are percentile bootstrap intervals over images, resampled within
each class (normal / defective), so every resample has both. A paired
comparison draws the same images for both runs; across sets, each set is
resampled on its own and the per-set differences are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

#: Score bins of a run's pixel statistics (twice as many are used: see :func:`bin_edges`).
BINS = 2048
#: Bootstrap resamples.
RESAMPLES = 1000
#: Integration limit of AUPRO (false-positive rate).
PRO_FPR = 0.3
#: Pixels sampled per image to place the bin edges.
EDGE_SAMPLE = 20_000


@dataclass
class RunStats:
    """Per-image statistics of one run on one test set (see the module docstring)."""

    keys: list[str]  # one per image (e.g. ``kind/stem``), the pairing key
    labels: np.ndarray  # [N] 0 normal, 1 defective
    scores: np.ndarray  # [N] image scores
    normal_hist: np.ndarray  # [N, B] normal pixels per bin (None-equivalent: empty when no maps)
    defect_hist: np.ndarray  # [N, B] defect pixels per bin
    region_hist: np.ndarray  # [R, B] pixels per bin of each defect region
    region_image: np.ndarray  # [R] image index of each region
    rule_scores: dict[str, np.ndarray] = field(default_factory=dict)  # other image-score rules, [N] each

    @property
    def has_pixels(self) -> bool:
        """Whether pixel statistics were kept (maps and masks)."""
        return self.normal_hist.size > 0 and self.defect_hist.sum() > 0

    def save(self, path: Path) -> None:
        """Write the statistics to ``path`` (``.npz``) atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, keys=np.array(self.keys), labels=self.labels, scores=self.scores,
                            normal_hist=self.normal_hist, defect_hist=self.defect_hist,
                            region_hist=self.region_hist, region_image=self.region_image,
                        **{f"rule_{k}": v for k, v in self.rule_scores.items()})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> RunStats:
        """Read statistics written by :meth:`save`."""
        with np.load(path) as data:
            rules = {k.removeprefix("rule_"): data[k] for k in data.files if k.startswith("rule_")}
            return cls([str(k) for k in data["keys"]], data["labels"], data["scores"], data["normal_hist"],
                       data["defect_hist"], data["region_hist"], data["region_image"], rules)

    def with_rule(self, rule: str | None) -> RunStats:
        """The same statistics with the image scores of another rule (``None``: as they are)."""
        if rule is None:
            return self
        if rule not in self.rule_scores:
            raise KeyError(f"no image scores of rule {rule!r}; kept: {sorted(self.rule_scores)}")
        return replace(self, scores=self.rule_scores[rule])

    def aligned(self, keys: Sequence[str]) -> RunStats:
        """The same statistics with images in the order of ``keys`` (which must be the same set of images)."""
        if sorted(keys) != sorted(self.keys):
            missing = sorted(set(keys) ^ set(self.keys))[:5]
            raise ValueError(f"the runs were scored on different images (e.g. {missing}): they cannot be paired")
        position = {k: i for i, k in enumerate(self.keys)}
        order = np.array([position[k] for k in keys])
        inverse = np.argsort(order)
        return RunStats(list(keys), self.labels[order], self.scores[order], self.normal_hist[order],
                        self.defect_hist[order], self.region_hist, inverse[self.region_image],
                        {k: v[order] for k, v in self.rule_scores.items()})


def bin_edges(maps: Iterable[np.ndarray], bins: int = BINS, seed: int = 0) -> np.ndarray:
    """``bins`` increasing threshold edges: quantiles of a sample of every map's pixels (the first is -inf)."""
    rng = np.random.default_rng(seed)
    sample = []
    for m in maps:
        flat = np.asarray(m, np.float32).ravel()
        sample.append(flat if flat.size <= EDGE_SAMPLE else flat[rng.integers(0, flat.size, EDGE_SAMPLE)])
    values = np.concatenate(sample)
    # evenly spaced quantiles, and as many again in the top 1% where defects and thresholds live
    levels = np.concatenate([np.linspace(0, 1, bins + 1)[1:-1], 1 - np.logspace(-2, -6, bins)])
    edges = np.unique(np.quantile(values, levels))
    return np.concatenate([[-np.inf], edges])


def image_pixel_stats(
    anomaly_map: np.ndarray, mask: np.ndarray | None, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Normal-pixel histogram, defect-pixel histogram and per-region histograms of one map on ``edges``."""
    from scipy import ndimage

    bins = len(edges)
    index = np.searchsorted(edges, np.asarray(anomaly_map, np.float32).ravel(), side="right") - 1
    if mask is None or not mask.any():
        return np.bincount(index, minlength=bins), np.zeros(bins, np.int64), []
    defect = np.asarray(mask).ravel() > 0
    normal_hist = np.bincount(index[~defect], minlength=bins)
    defect_hist = np.bincount(index[defect], minlength=bins)
    regions, count = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), bool))
    flat = regions.ravel()
    region_hists = [np.bincount(index[flat == r], minlength=bins) for r in range(1, count + 1)]
    return normal_hist, defect_hist, region_hists


def collect(
    keys: Sequence[str],
    labels: Sequence[int],
    scores: Sequence[float],
    maps: Sequence[np.ndarray] | None,
    masks: Sequence[np.ndarray | None] | None,
) -> RunStats:
    """Per-image statistics of a run from its image scores and (optionally) full-resolution maps and masks."""
    n = len(keys)
    if not (len(labels) == len(scores) == n):
        raise ValueError("keys, labels and scores must have one entry per image")
    if maps is None or masks is None or all(m is None for m in masks):
        empty = np.zeros((n, 0), np.int64)
        return RunStats(list(keys), np.asarray(labels, np.int64), np.asarray(scores, np.float64), empty, empty,
                        np.zeros((0, 0), np.int64), np.zeros(0, np.int64))
    edges = bin_edges(maps)
    normal, defect, regions, region_image = [], [], [], []
    for i, (m, mask) in enumerate(zip(maps, masks)):
        if mask is not None and mask.shape != m.shape:
            raise ValueError(f"{keys[i]}: mask {mask.shape} and map {m.shape} differ in size")
        nh, dh, rh = image_pixel_stats(m, mask, edges)
        normal.append(nh)
        defect.append(dh)
        regions += rh
        region_image += [i] * len(rh)
    bins = len(edges)
    return RunStats(list(keys), np.asarray(labels, np.int64), np.asarray(scores, np.float64),
                    np.stack(normal).astype(np.int64), np.stack(defect).astype(np.int64),
                    np.stack(regions).astype(np.int64) if regions else np.zeros((0, bins), np.int64),
                    np.asarray(region_image, np.int64))


# ------------------------------------------------------------------------------------------- metrics


def _at_least(hist: np.ndarray) -> np.ndarray:
    """Counts at or above each threshold: reverse cumulative sum along the last axis."""
    return np.flip(np.cumsum(np.flip(hist, -1), -1), -1).astype(np.float64)


def image_auroc(stats: RunStats, weights: np.ndarray) -> np.ndarray:
    """Image AUROC for each row of image weights ``[S, N]`` (ties count one half)."""
    pos = stats.labels == 1
    s_pos, s_neg = stats.scores[pos], stats.scores[~pos]
    wins = (s_pos[:, None] > s_neg[None, :]) + 0.5 * (s_pos[:, None] == s_neg[None, :])
    w_pos, w_neg = weights[:, pos], weights[:, ~pos]
    return np.einsum("sp,pn,sn->s", w_pos, wins, w_neg) / (w_pos.sum(1) * w_neg.sum(1))


def pixel_metrics(stats: RunStats, weights: np.ndarray, pro_fpr: float = PRO_FPR) -> dict[str, np.ndarray]:
    """Pixel AUROC, pixel AP, pixel F1-max and AUPRO (up to ``pro_fpr``) for each row of weights ``[S, N]``."""
    negatives = _at_least(weights @ stats.normal_hist)  # [S, B] normal pixels >= threshold
    positives = _at_least(weights @ stats.defect_hist)
    n_total, p_total = negatives[:, :1], positives[:, :1]
    fpr = np.concatenate([negatives / n_total, np.zeros((len(weights), 1))], 1)  # thresholds rising; then none
    tpr = np.concatenate([positives / p_total, np.zeros((len(weights), 1))], 1)
    auroc = -np.trapezoid(tpr, fpr, axis=1)
    flagged = negatives + positives
    precision = np.divide(positives, flagged, out=np.ones_like(positives), where=flagged > 0)
    recall = positives / p_total
    recall_steps = recall - np.concatenate([recall[:, 1:], np.zeros((len(weights), 1))], 1)
    ap = (recall_steps * precision).sum(1)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(recall), where=precision + recall > 0)
    result = {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1_max": f1.max(1)}
    if len(stats.region_hist):
        region_weights = weights[:, stats.region_image]  # [S, R]
        overlap = _at_least(stats.region_hist) / stats.region_hist.sum(1, keepdims=True)  # [R, B]
        pro = (region_weights @ overlap) / region_weights.sum(1, keepdims=True)
        aupro = np.empty(len(weights))
        for s in range(len(weights)):
            x, y = fpr[s, ::-1], np.concatenate([[0.0], pro[s, ::-1]])  # rising FPR
            keep = x <= pro_fpr
            xs = np.concatenate([x[keep], [pro_fpr]])
            ys = np.concatenate([y[keep], [np.interp(pro_fpr, x, y)]])
            aupro[s] = np.trapezoid(ys, xs) / pro_fpr
        result["aupro"] = aupro
    return result


def metrics(stats: RunStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of image weights ``[S, N]``."""
    out = {"image_auroc": image_auroc(stats, weights)}
    if stats.has_pixels:
        out.update(pixel_metrics(stats, weights))
    return out


def point(stats: RunStats) -> dict[str, float]:
    """Every metric on the whole test set."""
    return {k: float(v[0]) for k, v in metrics(stats, np.ones((1, len(stats.keys)))).items()}


def resample_weights(labels: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[S, N]`` multiplicities of a stratified bootstrap (each class resampled within itself)."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(labels)))
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        if len(members) == 0:
            continue
        draws = rng.integers(0, len(members), (resamples, len(members)))
        for s in range(resamples):
            np.add.at(weights[s], members[draws[s]], 1.0)
    return weights


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summary(stats: RunStats, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Point values and 95% bootstrap intervals (``<metric>_lo`` / ``<metric>_hi``) of every metric."""
    out: dict[str, float] = point(stats)
    for name, values in metrics(stats, resample_weights(stats.labels, resamples, seed)).items():
        out[f"{name}_lo"], out[f"{name}_hi"] = interval(values)
    return out


def paired(
    pairs: Sequence[tuple[RunStats, RunStats]], resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of ``A - B`` over one or more sets (mean of the per-set differences).

    ``pairs`` holds, per set, the statistics of runs A and B on the same images.
    Returns, per metric both runs have on every set, the mean difference, its 95%
    interval and the share of resamples in which A is better (``p_better``).
    """
    differences: dict[str, list[np.ndarray]] = {}
    points: dict[str, list[float]] = {}
    for index, (a, b) in enumerate(pairs):
        b = b.aligned(a.keys)
        weights = resample_weights(a.labels, resamples, seed + index)
        ma, mb = metrics(a, weights), metrics(b, weights)
        pa, pb = point(a), point(b)
        for name in ma.keys() & mb.keys():
            differences.setdefault(name, []).append(ma[name] - mb[name])
            points.setdefault(name, []).append(pa[name] - pb[name])
    out = {}
    for name, diffs in differences.items():
        if len(diffs) != len(pairs):
            continue
        mean = np.mean(diffs, axis=0)
        low, high = interval(mean)
        out[name] = {"difference": float(np.mean(points[name])), "lo": low, "hi": high,
                     "p_better": float((mean > 0).mean())}
    return out
