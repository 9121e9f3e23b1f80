"""The paired bootstrap and the per-image prediction files it reads."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark import bootstrap as BS
from benchmark import predictions as P


def _unit(a, b, group="d"):
    return BS.Unit(group, np.atleast_2d(np.asarray(a, dtype=bool)), np.atleast_2d(np.asarray(b, dtype=bool)))


def _mean_stat(key="u"):
    return {"m": lambda m: m[key]}


def test_a_known_difference_is_recovered_with_the_binomial_width():
    rng = np.random.default_rng(5)
    n = 3000
    a = rng.random(n) < 0.8
    b = np.where(rng.random(n) < 0.5, a, rng.random(n) < 0.6)  # correlated, as two models on one test set
    found = BS.paired_bootstrap({"u": _unit(a, b)}, _mean_stat())["m"]
    d = a.astype(float) - b.astype(float)
    assert found.delta == pytest.approx(100 * d.mean(), abs=1e-9)  # the observed difference, exactly
    assert found.low > 0 and found.contains(found.delta)
    # one seed: the paired difference of means has standard error sd(d)/sqrt(n); the 95% interval
    # is about +-1.96 of it (Monte Carlo error of 2000 resamples: a few percent of the width)
    half = 1.96 * 100 * d.std() / math.sqrt(n)
    assert (found.high - found.low) / 2 == pytest.approx(half, rel=0.1)


def test_equal_predictions_give_zero_and_symmetric_rows_an_interval_around_zero():
    rng = np.random.default_rng(1)
    a = rng.random((3, 400)) < 0.7
    same = BS.paired_bootstrap({"u": _unit(a, a)}, _mean_stat())["m"]
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)
    # as accurate, on different images: the difference is 0 and the interval straddles it
    b = np.roll(a, 1, axis=1)
    swapped = BS.paired_bootstrap({"u": _unit(a, b)}, _mean_stat())["m"]
    assert swapped.delta == 0.0 and swapped.low < 0 < swapped.high


def test_the_interval_is_deterministic():
    rng = np.random.default_rng(2)
    units = {("x", "base"): _unit(rng.random((2, 300)) < 0.6, rng.random((2, 300)) < 0.5, "x"),
             ("y", "base"): _unit(rng.random((2, 200)) < 0.7, rng.random((2, 200)) < 0.7, "y")}
    stats = {"avg": lambda m: (m[("x", "base")] + m[("y", "base")]) / 2}
    first = BS.paired_bootstrap(units, stats)
    again = BS.paired_bootstrap(dict(reversed(list(units.items()))), stats)
    assert first == again
    assert BS.paired_bootstrap(units, stats, seed=1) != first  # the seed is what fixes it


def test_pattern_draws_match_drawing_images():
    """Drawing counts of right/wrong patterns is drawing the images: the same distribution
    as an explicit resampling of image indices (and of seeds) per replicate."""
    rng = np.random.default_rng(3)
    seeds, n, draws = 3, 500, 4000
    a = rng.random((seeds, n)) < np.array([[0.55], [0.7], [0.6]])  # seeds differ: seed noise too
    b = rng.random((seeds, n)) < 0.6
    ours = BS.paired_bootstrap({"u": _unit(a, b)}, _mean_stat(), resamples=draws)["m"]
    check = np.random.default_rng(9)
    diffs = []
    for _ in range(draws):
        s = check.integers(0, seeds, seeds)
        i = check.integers(0, n, n)
        diffs.append(100 * (a[s][:, i].mean() - b[s][:, i].mean()))
    low, high = np.percentile(diffs, [2.5, 97.5])
    width = high - low
    assert ours.low == pytest.approx(low, abs=0.08 * width) and ours.high == pytest.approx(high, abs=0.08 * width)


def test_harmonic_mean_rows():
    """Base-to-novel rows: HM of the averaged Base and Novel, per replicate."""
    keys = [("d1", "base"), ("d1", "novel"), ("d2", "base"), ("d2", "novel")]
    stats = BS.row_statistics("base2novel", keys)
    m = {("d1", "base"): np.array([80.0]), ("d1", "novel"): np.array([60.0]),
         ("d2", "base"): np.array([90.0]), ("d2", "novel"): np.array([70.0])}
    assert stats[("average", "base")](m)[0] == 85.0 and stats[("average", "novel")](m)[0] == 65.0
    assert stats[("average", "hm")](m)[0] == pytest.approx(2 * 85 * 65 / 150)
    assert stats[("d2", "hm")](m)[0] == pytest.approx(2 * 90 * 70 / 160)
    # cross-dataset: the source is shown apart, not averaged
    transfer = BS.row_statistics("cross_dataset", [("imagenet", "imagenet"), ("imagenet", "eurosat"),
                                                   ("imagenet", "dtd")])
    m = {("imagenet", "imagenet"): np.array([70.0]), ("imagenet", "eurosat"): np.array([40.0]),
         ("imagenet", "dtd"): np.array([50.0])}
    assert transfer[("average", "accuracy")](m)[0] == 45.0 and transfer[("imagenet", "accuracy")](m)[0] == 70.0


class _Datum:
    def __init__(self, impath, label):
        self.impath, self.label = impath, label


def test_prediction_files_round_trip_and_merge(tmp_path):
    data = [_Datum(f"/data/eurosat/img{i}.jpg", i % 3) for i in range(7)]
    pred = np.array([0, 1, 1, 0, 1, 2, 2])
    first = P.Predictions.of(data, pred, root="/data")
    assert first.pred.dtype == np.int16 and first.label.dtype == np.int16
    assert first.correct.sum() == sum(int(p == d.label) for p, d in zip(pred, data))
    # the digest does not depend on where the data root lies, only on the list under it
    moved = P.Predictions.of([_Datum(d.impath.replace("/data", "/mnt/x"), d.label) for d in data], pred, "/mnt/x")
    assert moved.images == first.images
    assert P.Predictions.of(data[::-1], pred, "/data").images != first.images
    path = tmp_path / "predictions" / "run.npz"
    P.write(path, {"base": first})
    wide = P.Predictions(np.array([40000, 3]), np.array([40000, 5]), "x")  # more classes than int16 holds
    P.write(path, {"novel": wide})  # a later evaluation is added to the same file
    back = P.read(path)
    assert set(back) == {"base", "novel"} and back["novel"].pred.dtype == np.int32
    assert np.array_equal(back["base"].pred, pred) and back["base"].images == first.images
    assert P.load(tmp_path, {"predictions": "predictions/run.npz"})["base"].images == first.images
    assert P.load(tmp_path, {}) is None  # a record made before prediction files
    assert P.load(tmp_path, {"predictions": "predictions/gone.npz"}) is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(P.PredictionsError, match="not a predictions file"):
        P.read(tmp_path / "bad.npz")
