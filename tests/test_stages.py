"""Where a run's time goes (``benchmark.stages``): the per-stage breakdown in every record,
its schema, and the bench's stage breakdown of a toy-world run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark import records, stages
from benchmark.protocols import base2novel
from benchmark.trainer import execute

RUN_STAGES = [s for s in stages.STAGES if s != "imports"]


def _spec(root, method="coop", **opts):
    extra = ["OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0"]
    for key, value in opts.items():
        extra += [key, str(value)]
    return base2novel([method], ["eurosat"], [1], 2, root=str(root), backbone="tiny-clip-12", backbone_id="tiny",
                      opts=extra)[0]


def test_every_record_says_where_its_time_went(synthetic_root, tmp_path):
    record = execute(_spec(synthetic_root, **{"SPEED.CACHE_DIR": tmp_path}), "cpu", output=tmp_path)
    breakdown = record["timings"]["stages"]
    assert list(breakdown) == list(stages.STAGES) and all(v >= 0 for v in breakdown.values())
    for stage in ("datasets", "model", "data_loading", "training", "evaluation"):
        assert breakdown[stage] > 0, stage
    # the stages of the run add up to its total (each is rounded to a microsecond)
    assert sum(breakdown[s] for s in RUN_STAGES) == pytest.approx(record["timings"]["total_s"],
                                                                   abs=len(RUN_STAGES) * 1e-6)
    assert breakdown["training"] <= record["timings"]["train_s"]  # training waits for batches too
    assert records.validate(json.loads(json.dumps(record)))["timings"]["stages"] == breakdown


def test_imports_are_charged_to_the_first_run_of_a_process_only(monkeypatch):
    monkeypatch.setattr(stages, "_imports_s", 0.0)
    monkeypatch.setattr(stages, "_imports_charged", False)
    monkeypatch.setattr(stages, "_depth", 0)
    stages.import_begin()
    stages.import_begin()  # nested spans count once
    stages.import_end()
    stages.import_end()
    measured = stages.imports_seconds()
    assert measured > 0
    assert stages.take_imports() == measured and stages.take_imports() == 0.0


def test_a_sweep_records_imports_once(synthetic_root, tmp_path, monkeypatch):
    from benchmark.sweep import run_sweep
    from benchmark import store

    monkeypatch.setattr(stages, "_imports_charged", False)
    specs = base2novel(["zsclip", "coop"], ["eurosat"], [1, 2], 2, root=str(synthetic_root), backbone="tiny-clip-12",
                       backbone_id="tiny", opts=["OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0"])
    run_sweep(specs, tmp_path)
    found = [r["timings"]["stages"]["imports"] for r in store.iter_records(tmp_path)]
    assert len(found) == 4 and sorted(found)[:3] == [0.0, 0.0, 0.0]
    assert stages.total(store.iter_records(tmp_path))["imports"] == max(found)
    assert max(found) == pytest.approx(stages.imports_seconds(), abs=1e-6)  # rounded to a microsecond


def test_records_without_a_breakdown_load_and_a_bad_one_is_named():
    record = {"schema_version": 2, "id": "x", "status": "ok", "method": "coop", "protocol": "base2novel",
              "dataset": "eurosat", "shots": 16, "seed": 1, "metrics": {}, "timings": {"train_s": 1.0}}
    assert records.validate(record) is record and stages.stages_of(record) is None
    for bad in ({"training": "fast"}, {"training": None}, ["training"], {"training": True}):
        with pytest.raises(records.RecordError, match="timings.stages"):
            records.validate({**record, "timings": {"train_s": 1.0, "stages": bad}})
    good = {**record, "timings": {"train_s": 1.0, "stages": {"training": 0.5, "evaluation": 0.25}}}
    assert stages.total([good, record])["training"] == 0.5


def test_stage_table_shows_seconds_and_shares():
    text = stages.table({"plain": {"training": 3.0, "evaluation": 1.0}, "fast": {"training": 1.0}})
    assert "| training steps (compute) | 3.00 s (75%) | 1.00 s (100%) |" in text
    assert "| **total** | 4.00 s | 1.00 s |" in text
    with pytest.raises(KeyError, match="unknown stage"):
        with stages.StageTimer()("compiling"):
            pass


def test_bench_prints_the_stage_breakdown_of_a_toy_run(tmp_path, monkeypatch, capsys):
    """The bench's toy-world section, on a small toy world placed where the machine's would be."""
    from benchmark.cli import main
    from datasets.toy import write_toy_root
    from datasets.worlds import WORLDS_ENV, world_folder_name, write_manifest

    monkeypatch.setenv(WORLDS_ENV, str(tmp_path / "worlds"))
    world = write_toy_root(tmp_path / "worlds" / world_folder_name("toy"), ["eurosat"],
                           sizes={"train": 4, "val": 1, "test": 2})
    write_manifest("toy", world)  # a world as the harness writes it: its manifest last
    written = sorted((p, p.stat().st_mtime_ns) for p in Path(world).rglob("*") if p.is_file())
    args = ["bench", "--methods", "coop", "--skip-run", "--repeats", "1", "--steps", "1", "--text-classes", "4",
            "--classes", "2", "--test-per-class", "1", "--epochs", "1", "--shots", "2", "--device", "cpu",
            "--toy-dataset", "EuroSAT", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    shown = capsys.readouterr().out
    (saved,) = (tmp_path / "out" / "bench").glob("*.json")
    (row,) = json.loads(saved.read_text())["rows"]
    assert row["toy_dataset"] == "eurosat" and row["toy_same"]
    assert [(p, p.stat().st_mtime_ns) for p, _ in written] == written  # the world's files read, not rewritten
    for label in ("plain", "fast_cold", "fast"):
        assert set(row[f"toy_stages_{label}"]) == set(stages.STAGES)
        assert row[f"toy_acc_{label}"] == row["toy_acc_plain"]
    assert "Toy-world run, coop on eurosat" in shown and "| data loading (waiting for batches) |" in shown
    assert main(args[:-4] + ["--toy-dataset", "imagenet_sketch", "--output", str(tmp_path / "o")]) == 2
    assert "base-to-novel dataset" in capsys.readouterr().out
