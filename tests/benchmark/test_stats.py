"""Paired differences and the two-level bootstrap, on synthetic scores with known effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from orchestrator.benchmark.stats import compare, hierarchical_bootstrap, paired_matrix


def _differences(rng, effect, *, seeds=3, images=200, seed_sd=0.5, shared_sd=5.0, noise_sd=8.0):
    """Per-image differences in points: a shared per-image part (some images gain more from the
    method, under every seed), a per-seed part (training noise) and per-cell noise."""
    shared = rng.normal(0, shared_sd, images)
    per_seed = rng.normal(0, seed_sd, (seeds, 1))
    return effect + shared + per_seed + rng.normal(0, noise_sd, (seeds, images))


def _scores(rng, effect_points, *, seeds=3, images=200) -> pd.DataFrame:
    """A benchmark's per-image table for `base` and `method` on one dataset."""
    difficulty = rng.uniform(0.3, 0.9, images)
    rows = []
    for seed in range(seeds):
        shift = rng.normal(0, 0.005)
        for i in range(images):
            prompt = f"box {i},{i},{i + 9},{i + 9}"
            base = difficulty[i] + rng.normal(0, 0.06)
            method = difficulty[i] + effect_points / 100 + shift + rng.normal(0, 0.06)
            for name, value in (("base", base), ("method", method)):
                rows.append(
                    {
                        "method": name,
                        "dataset": "d",
                        "seed": seed,
                        "image_id": f"img{i:04d}",
                        "prompt": prompt,
                        "iou": value,
                    }
                )
    return pd.DataFrame(rows)


def test_a_two_point_gain_is_detected_and_estimated():
    scores = _scores(np.random.default_rng(0), 2.0)
    (c,) = compare(scores, [("method", "base")], {"d": ["iou"]}, resamples=2000, rng_seed=0)
    assert c.seeds == 3 and c.images == 200 and c.prompt_mismatches == 0
    assert c.significant and c.verdict == "better", c
    assert c.ci_low <= 2.0 <= c.ci_high and c.ci_low > 0
    assert abs(c.difference - (c.mean_method - c.mean_base)) < 1e-9
    # the same data read the other way round is a loss
    (r,) = compare(scores, [("base", "method")], {"d": ["iou"]}, resamples=2000, rng_seed=0)
    assert r.verdict == "worse" and r.ci_high < 0


def test_without_an_effect_the_interval_covers_zero_in_at_least_90_percent_of_200_runs():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(200):
        _, low, high = hierarchical_bootstrap(_differences(rng, 0.0), resamples=1000, rng_seed=rep)
        covered += low <= 0 <= high
    assert covered >= 180, covered


def test_one_seed_reduces_to_scipy_bootstrap_over_images():
    d = _differences(np.random.default_rng(2), 1.0, seeds=1, images=300)
    mean, low, high = hierarchical_bootstrap(d, resamples=5000, rng_seed=3)
    ref = scipy_stats.bootstrap(
        (d[0],), np.mean, n_resamples=5000, method="percentile", rng=np.random.default_rng(4)
    )
    assert mean == pytest.approx(d.mean())
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.15)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.15)


def test_seed_noise_widens_the_interval():
    rng = np.random.default_rng(5)
    quiet = _differences(rng, 0.0, seed_sd=0.0)
    noisy = quiet + np.array([[-3.0], [0.0], [3.0]])  # the same images, training noise added
    _, ql, qh = hierarchical_bootstrap(quiet, rng_seed=0)
    _, nl, nh = hierarchical_bootstrap(noisy, rng_seed=0)
    assert nh - nl > 2 * (qh - ql)


def test_pairs_use_only_shared_seeds_and_images_and_count_prompt_mismatches():
    scores = _scores(np.random.default_rng(6), 0.0, seeds=2, images=5)
    scores = scores[~((scores["method"] == "method") & (scores["image_id"] == "img0004"))]
    scores.loc[(scores["method"] == "method") & (scores["image_id"] == "img0000"), "prompt"] = "x"
    a, b, seeds, mismatches, groups = paired_matrix(scores, "method", "base", "d", "iou")
    assert list(groups) == [0, 1, 2, 3]  # no image column: each sample is its own image
    assert a.shape == b.shape == (2, 4) and list(seeds) == [0, 1]
    assert mismatches == 2  # img0000 under both seeds
    with pytest.raises(ValueError, match="complete"):
        hierarchical_bootstrap(np.array([[1.0, np.nan]]))


def test_instances_of_one_image_are_resampled_together():
    """Instances share their image's difficulty: drawing them one by one would make the interval
    too narrow (coverage far below 95 %); drawing whole images keeps it near nominal."""
    images, per_image, reps = 40, 6, 200
    groups = np.repeat(np.arange(images), per_image)
    covered = {"cluster": 0, "naive": 0}
    for rep in range(reps):
        rng = np.random.default_rng(100 + rep)
        d = rng.normal(0, 6.0, images)[groups] + rng.normal(0, 1.0, images * per_image)
        d = d[None, :]  # one seed, true mean difference 0
        _, lo, hi = hierarchical_bootstrap(d, groups=groups, resamples=400, rng_seed=rep)
        covered["cluster"] += lo <= 0 <= hi
        _, lo, hi = hierarchical_bootstrap(d, resamples=400, rng_seed=rep)
        covered["naive"] += lo <= 0 <= hi
    assert covered["cluster"] / reps >= 0.88, covered
    assert covered["naive"] / reps <= 0.75, covered
    # the image column of a score table gives the groups
    rows = [
        {
            "method": m,
            "dataset": "d",
            "seed": 0,
            "image_id": f"im{i // 2}#{i}",
            "image": f"im{i // 2}",
            "prompt": "box",
            "iou": 0.5 + 0.01 * i * (m == "a"),
        }
        for m in ("a", "b")
        for i in range(6)
    ]
    *_, groups = paired_matrix(pd.DataFrame(rows), "a", "b", "d", "iou")
    assert list(groups) == [0, 0, 1, 1, 2, 2]
    (c,) = compare(pd.DataFrame(rows), [("a", "b")], {"d": ["iou"]}, resamples=200)
    assert (c.images, c.samples) == (3, 6)
