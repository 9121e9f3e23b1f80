"""Paired bootstrap intervals for the difference between two rows of a table.

Two rows (two methods, or two grid points of an ablation) are evaluated on the same test
images with the same seeds, and each run keeps its per-image predictions
(``benchmark.predictions``).  The difference of the rows' means has two sources of noise,
and each bootstrap replicate redraws both, the same way for the two rows (paired):

* the test images: every evaluation's test set (a dataset's base or novel classes, a
  transfer target) is drawn with replacement, one draw shared by both rows and by every
  seed (all seeds evaluate the same images);
* the seeds (the few-shot draw, initialisation and batch order): the seeds of each trained
  model group are drawn with replacement, one draw shared by the evaluations of that
  training (base and novel of a dataset; every target of an ImageNet training) and by both
  rows (seed s of one row is paired with seed s of the other: the same few-shot images).

Each row's value is then computed as the tables compute it (per dataset the mean over
seeds, then the mean over datasets; HM of the averaged Base and Novel), and the 2.5 and
97.5 percentiles of the replicates' differences give the 95% interval.  The generator has
a fixed seed, so the same records always give the same interval.

Drawing n images with replacement only matters through each image's pattern of right and
wrong answers over the seeds of both rows, so a replicate draws counts of those patterns
(at most 4^seeds of them) from a multinomial with their frequencies: the same distribution
as drawing the images, at a cost that does not grow with the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from benchmark import predictions as P

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
NO_PREDICTIONS = ("no interval: some runs have no per-image predictions (records made before they were stored); "
                  "run them again with --force to get one")


@dataclass
class Unit:
    """One evaluation of both rows, over the seeds they share."""

    group: Hashable  # the trained model group: its evaluations share the seed draw
    a: np.ndarray  # [seeds, images] bool, right or wrong, row A
    b: np.ndarray  # [seeds, images] bool, row B


@dataclass(frozen=True)
class Interval:
    delta: float  # row A minus row B, as the table computes the rows
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def text(self) -> str:
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


Statistic = Callable[[Mapping[Hashable, np.ndarray]], np.ndarray]


def paired_bootstrap(units: Mapping[Hashable, Unit], statistics: Mapping[Hashable, Statistic], *,
                     resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[Hashable, Interval]:
    """``statistics``: name -> function of the units' mean accuracies (percent, arrays of
    replicates) giving a row's value.  Returns name -> the difference A - B with its interval."""
    rng = np.random.default_rng(seed)
    order = sorted(units, key=repr)
    groups: dict[Hashable, int] = {}
    for key in order:
        seeds = units[key].a.shape[0]
        if units[key].b.shape != units[key].a.shape:
            raise ValueError(f"{key}: the rows have {units[key].a.shape} and {units[key].b.shape} (seeds, images)")
        if groups.setdefault(units[key].group, seeds) != seeds:
            raise ValueError(f"{key}: the evaluations of group {units[key].group!r} have different seed counts")
    seed_weights = {g: rng.multinomial(s, np.full(s, 1.0 / s), size=resamples) / s
                    for g, s in sorted(groups.items(), key=lambda item: repr(item[0]))}
    drawn_a, drawn_b, seen_a, seen_b = {}, {}, {}, {}
    for key in order:
        unit = units[key]
        seeds, n = unit.a.shape
        seen_a[key] = np.array([100.0 * unit.a.mean()])
        seen_b[key] = np.array([100.0 * unit.b.mean()])
        bits = np.concatenate([unit.a, unit.b]).astype(np.int8)
        patterns, counts = np.unique(bits, axis=1, return_counts=True)  # [2 seeds, P], [P]
        draws = rng.multinomial(n, counts / n, size=resamples)  # [B, P]: images drawn per pattern
        per_seed = draws @ patterns.T.astype(float) / n  # [B, 2 seeds]: accuracy per seed
        weights = seed_weights[unit.group]
        drawn_a[key] = 100.0 * (per_seed[:, :seeds] * weights).sum(axis=1)
        drawn_b[key] = 100.0 * (per_seed[:, seeds:] * weights).sum(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    out = {}
    for name, statistic in statistics.items():
        diff = statistic(drawn_a) - statistic(drawn_b)
        low, high = np.nanpercentile(diff, [tail, 100.0 - tail])
        out[name] = Interval(float((statistic(seen_a) - statistic(seen_b))[0]), float(low), float(high))
    return out


# -- rows of the tables ----------------------------------------------------------------------------
def harmonic_mean(base, novel):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base + novel > 0, 2 * base * novel / (base + novel), np.nan)


def _mean(values: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(values), axis=0)


def row_statistics(protocol: str, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Statistic]:
    """(dataset or "average", metric) -> statistic, for units keyed (training dataset,
    evaluation name): Base, Novel and HM for base-to-novel; accuracy otherwise (per target
    for the transfer protocols, the source ImageNet apart from the average)."""
    stats: dict[tuple[str, str], Statistic] = {}
    if protocol == "base2novel":
        datasets = sorted({d for d, split in keys if split == "base"} & {d for d, split in keys if split == "novel"})
        for d in datasets:
            stats[(d, "base")] = lambda m, d=d: m[(d, "base")]
            stats[(d, "novel")] = lambda m, d=d: m[(d, "novel")]
            stats[(d, "hm")] = lambda m, d=d: harmonic_mean(m[(d, "base")], m[(d, "novel")])
        if datasets:
            base = lambda m: _mean([m[(d, "base")] for d in datasets])  # noqa: E731
            novel = lambda m: _mean([m[(d, "novel")] for d in datasets])  # noqa: E731
            stats[("average", "base")], stats[("average", "novel")] = base, novel
            stats[("average", "hm")] = lambda m: harmonic_mean(base(m), novel(m))
        return stats
    averaged = [key for key in keys if averaged_in(protocol, key[1] if protocol != "few_shot" else key[0])]
    for key in keys:
        stats[(key[1] if protocol != "few_shot" else key[0], "accuracy")] = lambda m, key=key: m[key]
    if averaged:
        stats[("average", "accuracy")] = lambda m: _mean([m[key] for key in averaged])
    return stats


def averaged_in(protocol: str, dataset: str) -> bool:
    """Whether a dataset enters the papers' average of a protocol (not the source ImageNet)."""
    from datasets.catalog import CROSS_DATASET_TARGETS, DG_DATASETS

    if protocol == "cross_dataset":
        return dataset in CROSS_DATASET_TARGETS
    if protocol == "domain_generalization":
        return dataset in DG_DATASETS
    return True


def evaluation_names(protocol: str) -> Callable[[str], bool] | None:
    """Which evaluations of a record belong to a protocol's table."""
    from datasets.catalog import CROSS_DATASET_TARGETS, DG_DATASETS

    if protocol == "cross_dataset":
        return lambda name: name == "imagenet" or name in CROSS_DATASET_TARGETS
    if protocol == "domain_generalization":
        return lambda name: name in DG_DATASETS
    return lambda name: True


def _one_per_run(row: Sequence[dict]) -> dict[tuple, dict]:
    """(dataset, seed) -> the row's record; two records of one run must be one computation
    (the same setting, as the tables keep the first of them)."""
    from benchmark.record_settings import setting_of

    index: dict[tuple, dict] = {}
    for r in row:
        key = (r["dataset"], r["seed"])
        if key not in index:
            index[key] = r
        elif setting_of(index[key]) != setting_of(r):
            raise ValueError(f"one row holds two runs of {key[0]}, seed {key[1]} ({index[key].get('id')} and "
                             f"{r.get('id')}) of different settings, which a row never mixes")
    return index


def compare_rows(output, protocol: str, row_a: Sequence[dict], row_b: Sequence[dict], *,
                 resamples: int = RESAMPLES, seed: int = SEED) -> tuple[dict | None, str]:
    """Row A minus row B (their records: one per training dataset and seed) with paired
    intervals: ((dataset, metric) -> Interval, "") or (None, why there is no interval).

    A row is one setting (``benchmark.record_settings.split_settings``): two records of one dataset
    and seed in a row, or a pair of runs on two backbones, are refused (``ValueError``)
    rather than one of them silently taken."""
    index_a, index_b = _one_per_run(row_a), _one_per_run(row_b)
    for key in index_a.keys() & index_b.keys():
        a, b = index_a[key].get("backbone_id"), index_b[key].get("backbone_id")
        if a is not None and b is not None and a != b:
            raise ValueError(f"{key[0]}, seed {key[1]}: the runs compared are on two backbones ({a} and {b}); "
                             "compare rows of the same backbone")
    if set(index_a) != set(index_b):
        return None, "no interval: the two rows do not have the same runs (datasets and seeds)"
    wanted = evaluation_names(protocol)
    loaded = {}
    for key in index_a:
        pair = (P.load(output, index_a[key]), P.load(output, index_b[key]))
        if pair[0] is None or pair[1] is None:
            return None, NO_PREDICTIONS
        loaded[key] = pair
    units: dict[tuple[str, str], Unit] = {}
    for dataset in sorted({d for d, _ in index_a}):
        seeds = sorted(s for d, s in index_a if d == dataset)
        names = set.intersection(*(set(loaded[(dataset, s)][0]) & set(loaded[(dataset, s)][1]) for s in seeds))
        for name in sorted(n for n in names if wanted(n)):
            preds = [(loaded[(dataset, s)][0][name], loaded[(dataset, s)][1][name]) for s in seeds]
            if len({p.images for pair in preds for p in pair}) != 1:
                return None, f"no interval: {dataset}/{name} was not evaluated on the same images by every run"
            units[(dataset, name)] = Unit(dataset, np.stack([a.correct for a, _ in preds]),
                                          np.stack([b.correct for _, b in preds]))
    if not units:
        return None, "no interval: no evaluation with predictions in both rows"
    return paired_bootstrap(units, row_statistics(protocol, list(units)), resamples=resamples, seed=seed), ""
