"""End to end: the command line on synthetic datasets with the tiny CLIP."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark import store
from benchmark.tables import base2novel_table, records_frame
from datasets.build import build_dataset

REPO = Path(__file__).resolve().parent.parent


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_base2novel_every_method(tmp_path, synthetic_root):
    out = tmp_path / "out"
    args = ["--methods", "mma,zsclip,coop,cocoop", "--protocol", "base2novel", "--datasets", "oxford_pets,eurosat",
            "--seeds", "1,2", "--output", str(out), "--root", str(synthetic_root), "--clip", "tiny-clip-12",
            "--opts", "OPTIM.MAX_EPOCH", "2", "DATALOADER.NUM_WORKERS", "0"]
    first = _run(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    # 4 methods x 2 datasets x 2 seeds = 16 runs
    assert "16 done, 0 already finished, 0 failed" in first.stdout

    records = list(store.iter_records(out))
    assert len(records) == 16 and all(r["status"] == "ok" for r in records)
    mma = next(r for r in records if r["method"] == "mma" and r["dataset"] == "eurosat" and r["seed"] == 1)
    assert set(mma["metrics"]) == {"base", "novel"}
    assert mma["train"]["steps"] > 0 and mma["compute"]["trainable_params"] > 0
    assert mma["config"]["TRAINER"]["MMADAPTER"]["ADAPTER_SCALE"] == 0.001
    # base = the first ceil(n/2) classes, novel = the rest
    n_all = len(build_dataset("eurosat", synthetic_root).classnames)
    assert mma["metrics"]["base"]["n_classes"] == math.ceil(n_all / 2) == mma["train"]["n_classes"]
    assert mma["metrics"]["novel"]["n_classes"] == n_all - math.ceil(n_all / 2)
    zs = next(r for r in records if r["method"] == "zsclip" and r["dataset"] == "eurosat" and r["seed"] == 1)
    assert zs["train"]["steps"] == 0
    coop = next(r for r in records if r["method"] == "coop" and r["dataset"] == "eurosat" and r["seed"] == 1)
    assert coop["train"]["learning_rates"] == [1e-5, 0.002]  # one constant warm-up epoch, then the base rate
    assert coop["compute"]["trainable_params"] == 4 * 64  # "a photo of a": 4 context vectors of width 64

    csv = pd.read_csv(out / "tables" / "base2novel-synthetic.csv")
    assert {"base", "novel", "hm"} <= set(csv.columns)
    assert set(csv["dataset"]) == {"oxford_pets", "eurosat", "average"}
    assert csv["paper_hm"].isna().all()  # fakes are never compared with published numbers
    assert all(r["world"] == "synthetic" for r in records)
    md = (out / "tables" / "base2novel-synthetic.md").read_text()
    assert "HM" in md and "Novel" in md

    # the table agrees with the records: HM of the seed means
    rows = records_frame(records)
    b = rows[(rows.method == "mma") & (rows.dataset == "eurosat") & (rows.split == "base")].accuracy.mean()
    n = rows[(rows.method == "mma") & (rows.dataset == "eurosat") & (rows.split == "novel")].accuracy.mean()
    line = csv[(csv.method == "mma") & (csv.dataset == "eurosat")].iloc[0]
    assert line.base == pytest.approx(b, abs=1e-4) and line.hm == pytest.approx(2 * b * n / (b + n), abs=1e-4)

    # a second invocation repeats nothing and rebuilds the same table
    second = _run(*args)
    assert second.returncode == 0, second.stderr
    assert "0 done, 16 already finished" in second.stdout
    assert pd.read_csv(out / "tables" / "base2novel-synthetic.csv").equals(csv)

    table = _run("table", "--output", str(out), "--format", "csv")
    assert table.returncode == 0 and "eurosat" in table.stdout


BASELINES = ["maple", "kgcoop", "clip_adapter", "tip_adapter", "tip_adapter_f", "linear_probe", "promptsrc"]


@pytest.mark.slow
def test_base2novel_every_other_baseline(tmp_path, synthetic_root):
    """The remaining baselines through the command line, with their own configs (one epoch)."""
    out = tmp_path / "out"
    result = _run("--methods", ",".join(BASELINES), "--protocol", "base2novel", "--datasets", "eurosat",
                  "--seeds", "1", "--output", str(out), "--root", str(synthetic_root), "--clip", "tiny-clip-12",
                  "--opts", "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(BASELINES)} done, 0 already finished, 0 failed" in " ".join(result.stdout.split())
    records = {r["method"]: r for r in store.iter_records(out)}
    assert set(records) == set(BASELINES) and all(r["status"] == "ok" for r in records.values())
    for name in ("maple", "kgcoop", "clip_adapter", "promptsrc"):  # trained by the shared loop
        assert records[name]["train"]["steps"] > 0 and records[name]["compute"]["trainable_params"] > 0
        assert set(records[name]["metrics"]) == {"base", "novel"}
    assert records["maple"]["config"]["TRAINER"]["MAPLE"]["PROMPT_DEPTH"] == 9
    # training-free and closed-form methods: chosen on the validation split, recorded
    for name in ("tip_adapter", "tip_adapter_f", "linear_probe"):
        assert records[name]["train"]["fit"]["selected_on"] == "val", records[name]["train"]["fit"]
    assert records["tip_adapter_f"]["train"]["steps"] > 0 and records["tip_adapter_f"]["compute"]["trainable_params"] > 0
    assert records["linear_probe"]["metrics"]["novel"]["status"] == "not_applicable"
    assert records["linear_probe"]["metrics"]["base"]["accuracy"] >= 0
    csv = pd.read_csv(out / "tables" / "base2novel-synthetic.csv")
    probe = csv[(csv.method == "linear_probe") & (csv.dataset == "eurosat")].iloc[0]
    assert probe.base == records["linear_probe"]["metrics"]["base"]["accuracy"] and pd.isna(probe.novel)


def test_table_from_hand_made_records():
    def rec(method, dataset, seed, base, novel):
        return {"id": f"{method}{dataset}{seed}", "status": "ok", "method": method, "protocol": "base2novel",
                "dataset": dataset, "shots": 16, "seed": seed,
                "metrics": {"base": {"accuracy": base}, "novel": {"accuracy": novel}}}

    records = [rec("mma", "eurosat", 1, 80.0, 60.0), rec("mma", "eurosat", 2, 90.0, 70.0),
               rec("mma", "dtd", 1, 50.0, 40.0),
               {"id": "x", "status": "failed", "method": "mma", "protocol": "base2novel", "dataset": "dtd",
                "seed": 2, "shots": 16}]
    paper = pd.DataFrame([{"method": "MMA", "dataset": "eurosat", "base": 85.0, "novel": 60.0, "hm": 70.35}])
    table = base2novel_table(records_frame(records), paper=paper)
    euro = table[(table.dataset == "eurosat")].iloc[0]
    assert euro.base == 85.0 and euro.novel == 65.0 and euro.base_std == 5.0 and euro.seeds == 2
    assert euro.hm == pytest.approx(2 * 85 * 65 / 150)
    assert euro.paper_hm == 70.35 and euro.delta_hm == pytest.approx(2 * 85 * 65 / 150 - 70.35)
    dtd = table[table.dataset == "dtd"].iloc[0]
    assert dtd.seeds == 1  # the failed seed is missing, not zero
    avg = table[table.dataset == "average"].iloc[0]
    assert avg.base == pytest.approx((85 + 50) / 2) and avg.novel == pytest.approx((65 + 40) / 2)
    assert avg.hm == pytest.approx(2 * 67.5 * 52.5 / 120)  # HM of the averages, not mean of HMs
    assert pd.isna(avg.paper_hm)  # no published dtd row: no comparable average


def test_bad_names_fail_before_any_work(tmp_path):
    result = _run("--methods", "mmaa", "--output", str(tmp_path))
    assert result.returncode == 2
    assert "Unknown method 'mmaa'" in result.stdout and "mma" in result.stdout
    result = _run("--datasets", "oxford_pet", "--output", str(tmp_path))
    assert result.returncode == 2 and "oxford_pets" in result.stdout
    assert not (tmp_path / "records").exists()


def test_paper_average_matches_the_datasets_shown():
    def rec(dataset, base, novel):
        return {"id": dataset, "status": "ok", "method": "mma", "protocol": "base2novel", "dataset": dataset,
                "shots": 16, "seed": 1, "metrics": {"base": {"accuracy": base}, "novel": {"accuracy": novel}}}

    paper = pd.DataFrame([{"method": "MMA", "dataset": "eurosat", "base": 80.0, "novel": 60.0, "hm": 68.57},
                          {"method": "MMA", "dataset": "dtd", "base": 60.0, "novel": 40.0, "hm": 48.0},
                          {"method": "MMA", "dataset": "average", "base": 83.2, "novel": 76.8, "hm": 79.87}])
    table = base2novel_table(records_frame([rec("eurosat", 70, 50), rec("dtd", 50, 30)]), paper=paper)
    avg = table[table.dataset == "average"].iloc[0]
    # two datasets shown: the published 11-dataset average would not be comparable
    assert avg.paper_base == 70.0 and avg.paper_novel == 50.0
    assert avg.paper_hm == pytest.approx(2 * 70 * 50 / 120)
    full = base2novel_table(records_frame([rec("eurosat", 70, 50), rec("dtd", 50, 30)]), paper=paper,
                            dataset_order=["eurosat", "dtd"])
    assert full[full.dataset == "average"].iloc[0].paper_hm == 79.87  # all datasets: the printed average


def test_missing_dataset_is_reported_before_any_work(tmp_path):
    (tmp_path / "DATA" / "eurosat").mkdir(parents=True)  # present but without split file or images
    result = _run("--datasets", "eurosat,dtd", "--root", str(tmp_path / "DATA"), "--clip", "tiny-clip-1",
                  "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    text = " ".join(result.stdout.split())
    assert "eurosat" in text and "split_zhou_EuroSAT.json" in text and "dtd" in text
    assert not (tmp_path / "out" / "records").exists()


def test_list_shows_methods_and_datasets():
    result = _run("list")
    assert result.returncode == 0
    assert "mma" in result.stdout and "zsclip" in result.stdout and "imagenet_sketch" in result.stdout
