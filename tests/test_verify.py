"""``python run.py verify``: a finished run of each protocol, run again from its record, comes out
identical; a record, predictions file, learned-weight summary or checkpoint that was tampered
with is reported as different, with what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark import predictions as per_image
from benchmark import store
from benchmark.cli import main
from benchmark.verify import verify


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A results folder with one CoOp run of each protocol (the ImageNet training of the
    cross-dataset and domain-generalisation protocols keeps its checkpoint)."""
    from datasets.synthetic import write_synthetic_root

    root = tmp_path_factory.mktemp("verify-data")
    write_synthetic_root(root, ["imagenet", "eurosat", "imagenetv2"])
    out = tmp_path_factory.mktemp("verify-out")
    assert main(["run", "--root", str(root), "--clip", "tiny-clip-12", "--methods", "coop", "--protocol", "all",
                 "--datasets", "eurosat,imagenetv2", "--seeds", "1", "--shots", "2", "--output", str(out), "-q",
                 "--opts", "OPTIM.MAX_EPOCH", "2"]) == 0
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _record(out: Path, protocol: str) -> tuple[Path, dict]:
    path = next((out / "records" / "coop" / protocol).rglob("*.json"))
    return path, json.loads(path.read_text())


def test_a_run_of_each_protocol_comes_out_identical(finished, capsys):
    verdicts = verify(finished)
    assert sorted(v.label.split("/")[1] for v in verdicts) == ["base2novel", "few_shot", "transfer"]
    for v in verdicts:
        assert v.identical, (v.label, v.summary(), v.notes)
        assert sum(total for _, total in v.predictions.values()) > 0
        assert v.weights and all(w["same"] for w in v.weights.values())
    transfer = next(v for v in verdicts if "transfer" in v.label)
    assert transfer.weights_source == "checkpoint"  # kept by the ImageNet training
    assert {v.weights_source for v in verdicts if v is not transfer} == {"summary"}
    assert main(["verify", str(finished)]) == 0
    assert "3 of 3 run(s) identical" in " ".join(capsys.readouterr().out.split())


def test_a_tampered_accuracy_is_reported(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    path, record = _record(out, "base2novel")
    record["metrics"]["base"]["accuracy"] = 99.0
    path.write_text(json.dumps(record))
    (v,) = verify(path)
    assert not v.identical and "base accuracy 99.00 recorded" in v.summary()
    assert main(["verify", str(path)]) == 1
    assert "0 of 1 run(s) identical" in " ".join(capsys.readouterr().out.split())


def test_tampered_predictions_are_counted(finished, tmp_path):
    out = _copy(finished, tmp_path)
    path, record = _record(out, "few_shot")
    kept = per_image.load(out, record)
    flipped = kept["test"].pred.copy()
    flipped[:2] = (flipped[:2] + 1) % (flipped.max() + 1)
    kept["test"] = per_image.Predictions(flipped, kept["test"].label, kept["test"].images)
    file = out / record["predictions"]
    file.unlink()
    per_image.write(file, kept)
    (v,) = verify(path)
    assert not v.identical and v.predictions["test"] == (2, len(flipped))
    assert f"2 of {len(flipped)} test predictions differ" in v.summary()


def test_a_tampered_weight_summary_is_reported_with_a_bound(finished, tmp_path):
    out = _copy(finished, tmp_path)
    path, record = _record(out, "base2novel")
    name = "prompt_learner.ctx"
    entry = record["learned"][name]
    entry["sha256"], entry["absmax"] = "0" * 64, entry["absmax"] + 0.25
    path.write_text(json.dumps(record))
    (v,) = verify(path)
    assert not v.identical and v.weights_source == "summary"
    assert v.weights[name]["at_least"] == pytest.approx(0.25, rel=1e-6)
    assert "learned weights differ by at least 0.25" in v.summary()


def test_a_tampered_checkpoint_gives_the_largest_difference(finished, tmp_path):
    out = _copy(finished, tmp_path)
    path, record = _record(out, "transfer")
    checkpoint = next((out / "checkpoints").rglob("*.pt"))
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    payload["state"]["prompt_learner.ctx"][0, 0] += 0.5
    torch.save(payload, checkpoint)
    (v,) = verify(path)
    assert not v.identical and v.weights_source == "checkpoint"
    assert v.weights["prompt_learner.ctx"]["max_abs"] == pytest.approx(0.5, rel=1e-5)
    assert not v.differing_predictions or v.predictions  # the predictions were compared as well


def test_a_missing_backbone_or_data_is_named_not_run(finished, tmp_path):
    out = _copy(finished, tmp_path)
    path, record = _record(out, "base2novel")
    record["backbone_id"] = "sha256:0000000000000000"
    path.write_text(json.dumps(record))
    (v,) = verify(path)
    assert not v.identical and "not the one the record was made with" in v.skipped and "--clip" in v.skipped
    path, record = _record(out, "few_shot")
    record["config"]["DATASET"]["ROOT"] = str(tmp_path / "gone")
    path.write_text(json.dumps(record))
    (v,) = verify(path)
    assert "pass --root DATA" in v.skipped
    assert all(store.read_record(p) for p in (out / "records").rglob("*.json"))  # nothing written there
    assert np.all([not p.name.endswith(".tmp") for p in out.rglob("*")])


def test_a_built_in_world_missing_here_is_written_again(tmp_path, monkeypatch):
    """A toy or synthetic record made on another machine names that machine's world folder:
    the same world (same version and writer: the folder's name) is written here and run."""
    from datasets.worlds import WORLDS_ENV, world_folder_name

    out = tmp_path / "out"
    assert main(["run", "--world", "synthetic", "--methods", "coop", "--datasets", "eurosat", "--seeds", "1",
                 "--output", str(out), "-q", "--workers", "1", "--opts", "OPTIM.MAX_EPOCH", "1"]) == 0
    path = next((out / "records").rglob("*.json"))
    record = json.loads(path.read_text())
    record["config"]["DATASET"]["ROOT"] = str(tmp_path / "another-machine" / world_folder_name("synthetic"))
    path.write_text(json.dumps(record))
    monkeypatch.setenv(WORLDS_ENV, str(tmp_path / "this-machine"))
    (v,) = verify(path)
    assert v.identical, (v.summary(), v.skipped)
    assert (tmp_path / "this-machine" / world_folder_name("synthetic")).is_dir()
    record["config"]["DATASET"]["ROOT"] = str(tmp_path / "another-machine" / "synthetic-v0-0000000000")
    path.write_text(json.dumps(record))
    (v,) = verify(path)  # a world written by other code: not silently replaced by this one
    assert "pass --root DATA" in v.skipped
