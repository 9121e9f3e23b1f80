"""The dataset-level layer analysis (MMA Figure 1): layer extraction against the model's own
forward pass, the sampling and split rule, the cache across seeds and runs, the command."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.analysis.dataset_level import (
    Settings,
    dataset_accuracy,
    linear_cka,
    run_dataset_level,
    sample_indices,
    split_halves,
    tower_accuracies,
)
from benchmark.analysis.layers import image_points, point_names, text_points
from benchmark.backbone import tokenize
from benchmark.cli import main
from tests.tolerance import assert_close, clip_ops

DATASETS = ["eurosat", "dtd", "oxford_pets"]


@pytest.fixture(scope="module")
def three_datasets(tmp_path_factory):
    from datasets.synthetic import write_synthetic_root

    return write_synthetic_root(tmp_path_factory.mktemp("analysis-data"), DATASETS)


def test_image_points_are_the_towers_own_activations_and_output(tiny_clip):
    """X_Embed is the class token entering block 1 (after the positional embedding and
    ln_pre), then each block's class token, then exactly encode_image's output.  The
    reference runs block by block with gradients on (other kernels than the hooked pass)."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    points = image_points(tiny_clip, images)
    visual = tiny_clip.visual
    assert len(points) == len(point_names(len(visual.transformer.resblocks))) == 14

    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (batch, patches, width)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    expected = [x[:, 0]]
    for block in visual.transformer.resblocks:
        x = block(x)
        expected.append(x[:, 0])
    expected.append(tiny_clip.encode_image(images))
    budget = clip_ops(tiny_clip)
    for name, got, want in zip(point_names(12), points, expected):
        assert_close(got, want, ops=budget, what=f"image point {name}")
    assert_close(points[-1], visual.ln_post(x[:, 0]) @ visual.proj, ops=budget, what="X_Proj = ln_post + proj")


def test_text_points_are_the_end_of_text_token_and_encode_text(tiny_clip):
    tokens = tokenize(["a photo of a red circle.", "a photo of a striped object on a grass background."])
    points = text_points(tiny_clip, tokens)
    eot = tokens.argmax(dim=-1)
    rows = torch.arange(len(tokens))
    x = tiny_clip.token_embedding(tokens) + tiny_clip.positional_embedding
    expected = [x[rows, eot]]
    for block in tiny_clip.transformer.resblocks:
        x = block(x, attn_mask=tiny_clip.attn_mask)
        expected.append(x[rows, eot])
    expected.append(tiny_clip.encode_text(tokens))
    budget = clip_ops(tiny_clip)
    for name, got, want in zip(point_names(12), points, expected):
        assert_close(got, want, ops=budget, what=f"text point {name}")
    assert_close(points[-1], tiny_clip.ln_final(x[rows, eot]) @ tiny_clip.text_projection, ops=budget,
                 what="X_Proj = ln_final + text_projection")


def test_samples_and_splits_are_disjoint_halves_reproducible_per_seed():
    groups = ["a"] * 7 + ["b"] * 4 + ["c"] * 10
    train, test = split_halves(groups, seed=1, tower="image")
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(len(groups)))
    for dataset, n in (("a", 7), ("b", 4), ("c", 10)):  # ceil(n/2) of each dataset trains
        assert sum(groups[i] == dataset for i in train) == (n + 1) // 2
    again = split_halves(groups, seed=1, tower="image")
    assert all(np.array_equal(u, v) for u, v in zip((train, test), again))
    assert not np.array_equal(train, split_halves(groups, seed=2, tower="image")[0])
    # a dataset's split depends on its own items only, not on which other datasets are analysed
    alone = split_halves(["c"] * 10, seed=1, tower="image")[0]
    assert list(alone + 11) == [i for i in train if groups[i] == "c"]

    # every layer of a tower is measured on the one split of its seed: equal features, equal accuracies
    features = np.random.default_rng(0).normal(size=(len(groups), 8))
    accuracies = tower_accuracies([features] * 4, groups, seed=1, tower="image")
    assert len(set(accuracies)) == 1  # exact: the same computation on the same features and split
    assert accuracies[0] == dataset_accuracy(features, groups, train, test)

    drawn = sample_indices(50, 20, seed=3, dataset="dtd")
    assert drawn == sample_indices(50, 20, seed=3, dataset="dtd") and len(set(drawn)) == 20
    assert drawn != sample_indices(50, 20, seed=4, dataset="dtd")


def test_classifier_and_gap_on_features_whose_answers_are_known():
    """Constant features: every prediction is one dataset, so balanced accuracy is exactly
    100 / datasets; features that name the dataset: 100.  CKA of a rotation and scaling: 1."""
    groups = ["a"] * 6 + ["b"] * 6 + ["c"] * 6
    train, test = split_halves(groups, seed=1, tower="text")
    assert dataset_accuracy(np.ones((18, 4)), groups, train, test) == pytest.approx(100 / 3, abs=1e-9)
    onehot = np.eye(3)[[0] * 6 + [1] * 6 + [2] * 6] + 0.01 * np.random.default_rng(0).normal(size=(18, 3))
    assert dataset_accuracy(onehot, groups, train, test) == 100.0
    x = np.random.default_rng(1).normal(size=(30, 5))
    rotation = np.linalg.qr(np.random.default_rng(2).normal(size=(5, 5)))[0]
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-12)


def _rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_analyze_command_writes_csv_table_and_figure(three_datasets, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["analyze", "dataset-level", "--root", str(three_datasets), "--clip", "tiny-clip-12",
                 "--datasets", ",".join(DATASETS), "--seeds", "1,2", "--samples-per-dataset", "6",
                 "--output", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = _rows(out / "analysis" / "dataset_level.csv")
    assert len(rows) == 2 * 14 * 2  # towers x points x seeds
    assert {(r["tower"], r["layer"], r["seed"]) for r in rows} == {
        (t, p, s) for t in ("text", "image") for p in point_names(12) for s in ("1", "2")}
    assert {r["backbone"] for r in rows} == {"tiny-clip-12"}
    # the class token entering block 1 is one learned vector for every image: chance, exactly
    assert all(float(r["accuracy"]) == pytest.approx(100 / 3, abs=1e-9)
               for r in rows if r["tower"] == "image" and r["layer"] == "X_Embed")
    assert all(0.0 <= 1.0 - float(r["gap"]) <= 1.0 + 1e-9 for r in rows if r["layer"] == "X_Proj")
    table = (out / "analysis" / "dataset_level.md").read_text()
    assert "| X_Embed" in table and "| X_Proj" in table and "text − image" in table
    assert "| X_Proj" in text  # printed too
    assert (out / "analysis" / "dataset_level.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_features_are_extracted_once_and_read_back_for_every_seed_and_run(three_datasets, tmp_path):
    settings = Settings(root=three_datasets, backbones=["tiny-clip-12"], datasets=DATASETS, seeds=[1, 2],
                        samples=6, output=tmp_path / "out", device="cpu")
    first = run_dataset_level(settings)
    assert first.extracted == [("tiny-clip-12", "text"), ("tiny-clip-12", "image")] and first.cached == []
    entries = sorted((tmp_path / "out" / "cache" / "analysis").glob("*.pt"))
    assert len(entries) == 2
    stored = torch.load(next(e for e in entries if e.name.startswith("image-")), weights_only=True)
    union = sum(len(set().union(*(sample_indices(n, 6, s, d) for s in (1, 2))))
                for d, n in zip(DATASETS, _train_sizes(three_datasets)))
    assert all(p.shape[0] == union for p in stored["points"])  # every image any seed draws, once

    second = run_dataset_level(settings)
    assert second.extracted == [] and second.cached == [("tiny-clip-12", "text"), ("tiny-clip-12", "image")]
    assert second.frame.equals(first.frame)

    image = next(d for d in _drawn_items(three_datasets, settings))  # an image the analysis uses, rewritten
    os.utime(image.impath, ns=(os.stat(image.impath).st_atime_ns, os.stat(image.impath).st_mtime_ns + 10**9))
    third = run_dataset_level(settings)
    assert third.extracted == [("tiny-clip-12", "image")] and third.cached == [("tiny-clip-12", "text")]


def _drawn_items(root: Path, settings: Settings):
    from datasets.build import build_dataset

    train = build_dataset(DATASETS[0], root).train
    return [train[i] for i in sample_indices(len(train), settings.samples, settings.seeds[0], DATASETS[0])]


def _train_sizes(root: Path) -> list[int]:
    from datasets.build import build_dataset

    return [len(build_dataset(d, root).train) for d in DATASETS]


@pytest.mark.parametrize("change, message", [
    (["--datasets", "eurosat,dtdd"], "Unknown dataset 'dtdd'"),
    (["--samples-per-dataset", "100000"], "fewer than --samples-per-dataset 100000"),
    (["--clip", "tiny-clip-99"], "Unknown backbone 'tiny-clip-99'"),
    (["--datasets", "eurosat"], "at least two datasets"),
])
def test_bad_input_is_a_clear_error(three_datasets, tmp_path, capsys, change, message):
    args = {"--root": str(three_datasets), "--clip": "tiny-clip-12", "--datasets": ",".join(DATASETS),
            "--samples-per-dataset": "6", "--output": str(tmp_path / "out"), "--seeds": "1"}
    args.update(dict(zip(change[::2], change[1::2])))
    code = main(["analyze", "dataset-level", *[v for pair in args.items() for v in pair]])
    assert code == 2
    assert message in " ".join(capsys.readouterr().out.split())
