"""Every protocol: run specs and configs, tables from hand-made records (missing seeds,
published numbers), the shared ImageNet training, dry runs, and a sweep killed mid-way
and resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark import protocols, store, tables
from benchmark.cli import main
from datasets.catalog import BASE2NOVEL_DATASETS, CROSS_DATASET_TARGETS, DG_DATASETS

REPO = Path(__file__).resolve().parent.parent
COMMON = dict(root="unused", backbone="tiny-clip-12", backbone_id="tiny")


def _expand(protocol, **kw):
    return protocols.expand(protocol, methods=kw.pop("methods", ["coop", "mma"]), seeds=[1, 2], **kw, **COMMON)


def test_all_means_every_protocol_with_one_shared_imagenet_training():
    specs = _expand("all")
    by = {}
    for spec in specs:
        by.setdefault(spec.protocol, []).append(spec)
    assert set(by) == {"base2novel", "few_shot", "transfer"}
    assert len(by["base2novel"]) == 2 * 11 * 2
    assert len(by["few_shot"]) == 2 * 11 * 5 * 2 and {s.shots for s in by["few_shot"]} == {1, 2, 4, 8, 16}
    # one ImageNet training per method and seed, evaluated on the source and all 14 targets
    assert len(by["transfer"]) == 2 * 2
    transfer = by["transfer"][0]
    assert transfer.dataset == "imagenet" and transfer.subsample == "all" and transfer.shots == 16
    assert [e.name for e in transfer.evals] == ["imagenet", *CROSS_DATASET_TARGETS, *DG_DATASETS]
    assert all(e.subsample == "all" for e in transfer.evals)
    # the targets are not part of the identity: asking for DG alone is the same training
    dg_only = _expand("domain_generalization")
    assert [e.name for e in dg_only[0].evals] == ["imagenet", *DG_DATASETS]
    assert {s.run_id for s in dg_only} == {s.run_id for s in by["transfer"]}
    assert {s.run_id for s in _expand("cross_dataset,domain_generalization")} == {s.run_id for s in dg_only}


def test_protocol_configs_follow_the_official_variants():
    coop = {(s.protocol, s.dataset, s.shots): s.config for s in _expand("all", methods=["coop"])}
    assert coop[("base2novel", "eurosat", 16)]["OPTIM"]["MAX_EPOCH"] == 200
    assert coop[("base2novel", "eurosat", 16)]["TRAINER"]["COOP"]["CTX_INIT"] == "a photo of a"
    # the CoOp paper's few-shot setting: 16 random context vectors, epochs by shots, ImageNet 50
    for shots, epochs in {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}.items():
        cfg = coop[("few_shot", "eurosat", shots)]
        assert cfg["OPTIM"]["MAX_EPOCH"] == epochs
        assert cfg["TRAINER"]["COOP"]["N_CTX"] == 16 and cfg["TRAINER"]["COOP"]["CTX_INIT"] == ""
    assert coop[("few_shot", "imagenet", 1)]["OPTIM"]["MAX_EPOCH"] == 50
    mma = next(s.config for s in _expand("cross_dataset", methods=["mma"]))
    assert mma["TRAINER"]["MMADAPTER"]["ADAPTER_START"] == 9 and mma["OPTIM"]["MAX_EPOCH"] == 1
    assert mma["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"] == 128  # the ImageNet config's batch


def test_protocol_names_and_dataset_lists_are_checked():
    with pytest.raises(protocols.ProtocolError, match="Did you mean 'few_shot'"):
        protocols.parse_protocols("fewshot")
    assert protocols.parse_protocols("few_shot,base2novel") == ["base2novel", "few_shot"]
    specs = _expand("base2novel,domain_generalization", datasets=["eurosat", "imagenet_a"], shots=[4])
    assert {(s.protocol, s.dataset) for s in specs} == {("base2novel", "eurosat"), ("transfer", "imagenet")}
    assert [e.name for e in specs[-1].evals] == ["imagenet", "imagenet_a"]
    with pytest.raises(protocols.ProtocolError, match="none of the datasets"):
        _expand("domain_generalization", datasets=["eurosat"])


# -- tables from hand-made records ------------------------------------------------------------
def _record(method, protocol, dataset, seed, metrics, shots=16, world="real"):
    return {"id": f"{method}{protocol}{dataset}{seed}{shots}", "status": "ok", "method": method,
            "protocol": protocol, "dataset": dataset, "shots": shots, "seed": seed, "world": world,
            "metrics": {k: {"accuracy": v} for k, v in metrics.items()}}


def test_cross_dataset_table_means_stds_missing_seeds_and_paper():
    targets = list(CROSS_DATASET_TARGETS)
    records = []
    for seed, shift in ((1, 0.0), (2, 2.0), (3, 4.0)):
        accs = {"imagenet": 70.0 + shift, **{t: 60.0 + i + shift for i, t in enumerate(targets)}}
        if seed == 3:
            del accs["dtd"]  # a missing evaluation: fewer seeds in that cell, never a zero
        records.append(_record("coop", "transfer", "imagenet", seed, accs))
    records.append(_record("coop", "base2novel", "eurosat", 1, {"base": 90.0, "novel": 50.0}))
    failed = dict(_record("coop", "transfer", "imagenet", 4, {"imagenet": 0.0}), status="failed")
    frame = tables.records_frame(records + [failed])
    table = tables.accuracy_table(frame, "cross_dataset", paper=tables.load_paper("cross_dataset"))
    cells = table.set_index("dataset")
    assert cells.loc["imagenet", "accuracy"] == pytest.approx(72.0)
    assert cells.loc["imagenet", "std"] == pytest.approx(np.std([70, 72, 74]))
    assert cells.loc["imagenet", "seeds"] == 3
    dtd = 60.0 + targets.index("dtd")
    assert cells.loc["dtd", "accuracy"] == pytest.approx(dtd + 1.0) and cells.loc["dtd", "seeds"] == 2
    # the average is over the 10 targets' seed means, the source excluded
    means = [60.0 + i + 2.0 for i in range(10)]
    means[targets.index("dtd")] = dtd + 1.0
    assert cells.loc["average", "accuracy"] == pytest.approx(np.mean(means))
    # published CoOp numbers beside ours, with the difference
    paper = pd.read_csv(REPO / "results" / "paper" / "cross_dataset.csv")
    pub = paper[(paper["method"] == "CoOp") & (paper["target_dataset"] == "eurosat")]["accuracy"].item()
    assert cells.loc["eurosat", "paper"] == pub
    assert cells.loc["eurosat", "delta"] == pytest.approx(cells.loc["eurosat", "accuracy"] - pub)
    shown = tables.accuracy_display(table)
    assert shown.loc[0, "dtd"].endswith("(n=2)") and "(n=" not in shown.loc[0, "eurosat"]
    assert shown.loc[1, "Method"].strip() == "paper (Δ)"

    # a target without any result: shown as missing, and no average
    partial = tables.accuracy_table(tables.records_frame(records[:1]).query("split != 'ucf101'"), "cross_dataset")
    assert "ucf101" not in set(partial["dataset"])
    assert math.isnan(partial.set_index("dataset").loc["average", "accuracy"])
    assert tables.accuracy_display(partial).loc[0, "average"] == "-"


def test_domain_generalization_and_few_shot_tables():
    records = [_record("mma", "transfer", "imagenet", s, {"imagenet": 72.0, **{d: 50.0 + s for d in DG_DATASETS},
                                                          "eurosat": 40.0}) for s in (1, 2)]
    dg = tables.accuracy_table(tables.records_frame(records), "domain_generalization",
                               paper=tables.load_paper("domain_generalization"))
    assert list(dg["dataset"]) == ["imagenet", *DG_DATASETS, "average"]
    assert dg.set_index("dataset").loc["average", "accuracy"] == pytest.approx(51.5)
    assert not np.isnan(dg.set_index("dataset").loc["imagenet_r", "paper"])  # MMA's published number

    few = [_record("coop", "few_shot", d, 1, {"test": 10.0 * k + i}, shots=k)
           for k in (1, 2, 4, 8, 16) for i, d in enumerate(BASE2NOVEL_DATASETS)]
    table = tables.accuracy_table(tables.records_frame(few), "few_shot", paper=tables.load_paper("few_shot"))
    avg = table[table["dataset"] == "average"].set_index("shots")["accuracy"]
    assert list(avg.index) == [1, 2, 4, 8, 16]
    assert avg.loc[4] == pytest.approx(40.0 + np.mean(range(11)))
    paper = table.set_index(["dataset", "shots"])["paper"]
    assert paper.loc[("eurosat", 2)] == 65.17 and paper.loc[("average", 16)] == 79.89  # CoOp, ViT-B/16
    assert np.isnan(paper.loc[("eurosat", 16)])  # that table gives only averages beyond 2 shots


def test_latex_and_compute_tables():
    records = [_record(m, "transfer", "imagenet", 1, {"imagenet": a, **{d: a for d in DG_DATASETS}})
               for m, a in (("coop", 60.0), ("mma", 70.0))]
    table = tables.accuracy_table(tables.records_frame(records), "domain_generalization")
    latex = tables.latex_table(tables.accuracy_display(table), caption="DG")
    assert "\\begin{tabular}" in latex and "\\toprule" in latex
    assert "\\textbf{70.00 $\\pm$ 0.00}" in latex and "\\textbf{60.00" not in latex
    for r, params in zip(records, (2048, 674560)):
        r["compute"] = {"trainable_params": params, "peak_memory_bytes": 2**30, "device": "cuda", "precision": "amp"}
        r["timings"] = {"train_s": 10.0, "total_s": 12.0}
    compute = tables.compute_table(records)
    assert list(compute["trainable_params"]) == [2048, 674560]
    assert list(compute["peak_memory_mib"]) == [1024.0, 1024.0]


# -- the shared training, end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def transfer_root(tmp_path_factory):
    from datasets.synthetic import write_synthetic_root

    root = tmp_path_factory.mktemp("transfer")
    write_synthetic_root(root, ["imagenet", "eurosat", "imagenetv2", "imagenet_a"])
    return root


def _cli(*args):
    return main(["run", "--clip", "tiny-clip-12", "--opts", "OPTIM.MAX_EPOCH", "1", *args])


@pytest.mark.slow
def test_every_protocol_end_to_end_and_targets_added_later_never_retrain(transfer_root, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--root", str(transfer_root), "--output", str(out), "--seeds", "1", "--methods", "coop"]
    # domain generalisation first: trains on ImageNet once
    assert _cli("--protocol", "domain_generalization", "--datasets", "imagenetv2,imagenet_a", *common) == 0
    path = next((out / "records" / "coop" / "transfer").rglob("*.json"))
    first = json.loads(path.read_text())
    assert set(first["metrics"]) == {"imagenet", "imagenetv2", "imagenet_a"}
    assert first["train"]["steps"] > 0 and Path(first["checkpoint"]).is_file()
    capsys.readouterr()

    # a dry run of everything: the ImageNet training only needs its cross-dataset target
    assert _cli("--protocol", "all", "--shots", "16", "--dry-run", *common[:-2], "--methods", "coop,zsclip",
                "--datasets", "eurosat,imagenetv2,imagenet_a") == 0
    text = " ".join(capsys.readouterr().out.split())
    # coop and zsclip: base2novel and few_shot on eurosat, and the ImageNet training each
    assert "0 done, 1 need more evaluations, 5 to do" in text and "Nothing was run" in text
    assert len(list(out.rglob("*.json"))) == 1

    # all protocols: the cross-dataset target comes from the saved weights, no training
    assert _cli("--protocol", "all", "--shots", "16", *common[:-2], "--methods", "coop,zsclip",
                "--datasets", "eurosat,imagenetv2,imagenet_a") == 0
    again = json.loads(path.read_text())
    assert set(again["metrics"]) == {"imagenet", "imagenetv2", "imagenet_a", "eurosat"}
    assert again["resumed_from_checkpoint"] and again["train"] == first["train"]
    for name in ("imagenet", "imagenetv2", "imagenet_a"):
        assert again["metrics"][name] == first["metrics"][name]
    protocols_done = {(r["method"], r["protocol"]) for r in store.iter_records(out)}
    assert protocols_done == {(m, p) for m in ("coop", "zsclip") for p in ("base2novel", "few_shot", "transfer")}
    for name in ("base2novel", "cross_dataset", "domain_generalization", "few_shot"):
        assert (out / "tables" / f"{name}-synthetic.csv").is_file()
    plot = out / "plots" / "few_shot-synthetic-eurosat.png"
    assert plot.stat().st_size > 5000
    from PIL import Image

    assert Image.open(plot).size == (540, 408)

    # the table command rebuilds them from the records alone, in every format
    capsys.readouterr()
    assert main(["table", "--output", str(out), "--protocol", "cross_dataset", "--format", "latex", "--compute"]) == 0
    text = capsys.readouterr().out
    assert "\\begin{tabular}" in text and "trainable_params" in text


# -- kill and resume --------------------------------------------------------------------------------
def _sweep(out: Path, root: Path) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "run.py"), "--methods", "coop,zsclip", "--protocol", "base2novel",
            "--datasets", "oxford_pets,eurosat", "--seeds", "1,2", "--root", str(root), "--clip", "tiny-clip-12",
            "--output", str(out), "--opts", "OPTIM.MAX_EPOCH", "3"]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_repeating_runs_and_gives_the_same_tables(synthetic_root, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _sweep(killed, synthetic_root)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "records").rglob("*.json"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # mid-way: some runs finished, one in progress
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Interrupted" in output
    finished = {p: p.stat().st_mtime_ns for p in (killed / "records").rglob("*.json")}
    assert 2 <= len(finished) < 8
    assert all(store.read_record(p)["status"] == "ok" for p in finished)  # no half-written record
    assert not [p for p in (killed / "records").rglob("*") if p.name.endswith(".tmp")]

    resumed = _sweep(killed, synthetic_root)
    text, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, text
    assert f"{8 - len(finished)} done, {len(finished)} already finished, 0 failed" in text
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # no finished run repeated

    uninterrupted = _sweep(clean, synthetic_root)
    text, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, text
    a = pd.read_csv(killed / "tables" / "base2novel-synthetic.csv")
    b = pd.read_csv(clean / "tables" / "base2novel-synthetic.csv")
    pd.testing.assert_frame_equal(a, b)  # same seeds, same machine: the same numbers
    assert os.listdir(killed / "records") == os.listdir(clean / "records")
