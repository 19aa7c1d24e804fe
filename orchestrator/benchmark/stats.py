"""Paired method comparisons with confidence intervals that count both sources of noise.

A benchmark's question is "does method A beat its base B, and by how much?". Both were scored
on the same test images with the same prompts, under the same seeds, so the comparison is
paired: per seed s and image i, d[s, i] = score_A[s, i] - score_B[s, i], and the estimate is the
mean of d. Its uncertainty has two sources: which seeds were trained (training noise) and which
images were tested (test sampling). The bootstrap here resamples both: seeds with replacement,
then images with replacement, the same image draw for every seed since all seeds share the test
images (a two-level, crossed bootstrap), and takes the percentile interval of the resampled
means. SciPy's `scipy.stats.bootstrap` resamples one level (independent or paired
observations), so it cannot express the seed level; with one seed this bootstrap reduces to
it, and the tests check that the two agree there. On instance datasets the unit drawn is
still the image, with all its instances (a cluster bootstrap): instances of one image share its
difficulty, and resampling them one by one would make the interval too narrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "LOWER_IS_BETTER",
    "Comparison",
    "compare",
    "hierarchical_bootstrap",
    "paired_matrix",
]


LOWER_IS_BETTER = frozenset({"mae"})


@dataclass
class Comparison:
    """One method vs its base on one dataset and metric; values in points (x100)."""

    method: str
    base: str
    dataset: str
    metric: str
    seeds: int
    images: int
    mean_method: float
    mean_base: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    rng_seed: int
    prompt_mismatches: int  # image/seed pairs scored with different prompts (should be 0)
    samples: int = 0  # scored samples: the images, or the instances in them

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "no detectable difference"
        higher = self.difference > 0
        better = higher != (self.metric in LOWER_IS_BETTER)
        return "better" if better else "worse"

    def as_row(self) -> dict[str, Any]:
        row = dict(self.__dict__)
        row.update(significant=self.significant, verdict=self.verdict)
        return row


def hierarchical_bootstrap(
    diffs: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    rng_seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile interval of the mean of `diffs` (seeds x samples).

    Each resample draws seeds with replacement and, independently, images with replacement
    (one draw shared by all seeds), and averages the selected cells. `groups` (one image index
    per column) makes the instances of an image one unit: an image is drawn with all its
    instances, since instances of one image share its difficulty (None: a column per image).
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.size == 0 or np.isnan(d).any():
        raise ValueError("diffs must be a complete seeds x images matrix")
    n_seeds, n_samples = d.shape
    groups = np.arange(n_samples) if groups is None else np.asarray(groups)
    if groups.shape != (n_samples,):
        raise ValueError(f"groups has shape {groups.shape}, diffs {n_samples} columns")
    n_images = int(groups.max()) + 1
    rng = np.random.default_rng(rng_seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(n_seeds * n_samples + n_images, 1))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        images = rng.integers(0, n_images, size=(b, n_images))
        seeds = rng.integers(0, n_seeds, size=(b, n_seeds))
        counts = np.zeros((b, n_images))
        np.add.at(counts, (np.arange(b)[:, None], images), 1.0)
        weights = counts[:, groups]  # (b, samples): how often each sample's image was drawn
        per_seed = (d @ weights.T) / weights.sum(axis=1)  # (seeds, b): each seed's mean
        stats[start : start + b] = np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(d.mean()), float(low), float(high)


def paired_matrix(
    scores: pd.DataFrame, method: str, base: str, dataset: str, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """(method scores, base scores, as seeds x samples, prompt mismatches, image index of each
    sample) on shared cells.

    Only seeds both methods finished and samples both scored under every such seed count. A
    sample is an image, or an instance of one (instance datasets); the optional `image` column
    of `scores` names the image a sample belongs to.
    """
    empty = np.empty((0, 0))
    sub = scores[(scores["dataset"] == dataset) & scores["method"].isin([method, base])]
    if metric not in sub.columns:
        return empty, empty, empty, 0, np.empty(0, np.int64)
    sub = sub.dropna(subset=[metric])
    a = sub[sub["method"] == method].set_index(["seed", "image_id"])
    b = sub[sub["method"] == base].set_index(["seed", "image_id"])
    joined = a[[metric, "prompt"]].join(b[[metric, "prompt"]], how="inner", rsuffix="_base")
    if joined.empty:
        return empty, empty, empty, 0, np.empty(0, np.int64)
    seeds = sorted(joined.index.get_level_values("seed").unique())
    per_seed = [set(joined.loc[s].index) for s in seeds]
    images = sorted(set.intersection(*per_seed))
    joined = joined.loc[[(s, i) for s in seeds for i in images]]
    shape = (len(seeds), len(images))
    mismatches = int((joined["prompt"] != joined["prompt_base"]).sum())
    if "image" in sub.columns:
        owner = sub.drop_duplicates("image_id").set_index("image_id")["image"].astype(str)
        _, groups = np.unique(owner.loc[images].to_numpy(), return_inverse=True)
    else:
        groups = np.arange(len(images))
    return (
        joined[metric].to_numpy().reshape(shape),
        joined[f"{metric}_base"].to_numpy().reshape(shape),
        np.asarray(seeds),
        mismatches,
        groups,
    )


def compare(
    scores: pd.DataFrame,
    pairs: list[tuple[str, str]],
    metrics: dict[str, list[str]],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    rng_seed: int = 0,
) -> list[Comparison]:
    """Every (method, base) pair on every dataset and metric in `metrics` ({dataset: [...]}).

    `scores` has one row per method, dataset, seed and image (columns method, dataset, seed,
    image_id, prompt and one per metric, as fractions). Pairs without shared cells are skipped.
    """
    out = []
    for method, base in pairs:
        for dataset, names in metrics.items():
            for metric in names:
                a, b, seeds, mismatches, groups = paired_matrix(
                    scores, method, base, dataset, metric
                )
                if a.size == 0:
                    continue
                mean, low, high = hierarchical_bootstrap(
                    100 * (a - b),
                    groups=groups,
                    resamples=resamples,
                    confidence=confidence,
                    rng_seed=rng_seed,
                )
                out.append(
                    Comparison(
                        method=method,
                        base=base,
                        dataset=dataset,
                        metric=metric,
                        seeds=len(seeds),
                        images=int(groups.max()) + 1,
                        samples=a.shape[1],
                        mean_method=float(100 * a.mean()),
                        mean_base=float(100 * b.mean()),
                        difference=mean,
                        ci_low=low,
                        ci_high=high,
                        confidence=confidence,
                        resamples=resamples,
                        rng_seed=rng_seed,
                        prompt_mismatches=mismatches,
                    )
                )
    return out
