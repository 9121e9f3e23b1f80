"""Ablations as sweeps: --grid expansion and identities, the ablation tables and plots from
hand-made records (averages, seed std, paired intervals against a reference point), and a
grid sweep end to end through the command line, resumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark import ablations, grid, predictions, protocols, records, store
from benchmark.cli import main
from benchmark.trainer import classification_metrics

COMMON = dict(root="unused", backbone="tiny-clip-12", backbone_id="tiny")
START = "TRAINER.MMADAPTER.ADAPTER_START"
SCALE = "TRAINER.MMADAPTER.ADAPTER_SCALE"

pytestmark = pytest.mark.usefixtures("wide_console")


def _grid_specs(items, methods=("mma",), protocol="base2novel", **kw):
    g = grid.parse_grid(items)
    grid.check_grid(g, methods, kw.get("opts", ()))
    return grid.expand_grid(g, protocol, methods=list(methods), datasets=kw.pop("datasets", ["eurosat"]),
                            seeds=kw.pop("seeds", [1]), **kw, **COMMON)


# -- expansion and identity ----------------------------------------------------------------------
def test_the_official_value_is_the_plain_run_and_two_keys_give_the_product():
    plain = protocols.expand("base2novel", methods=["mma"], datasets=["eurosat"], seeds=[1], **COMMON)[0]
    specs = _grid_specs([f"{START}=3,5,7,9"])
    assert [s.grid for s in specs] == [{START: k} for k in (3, 5, 7, 9)]
    five = specs[1]
    assert five.run_id == plain.run_id and five.grid_plain
    assert not any(s.grid_plain for s in specs if s is not five)
    assert len({s.run_id for s in specs}) == 4
    assert all(s.config["TRAINER"]["MMADAPTER"]["ADAPTER_START"] == s.grid[START] for s in specs)
    assert "[ADAPTER_START=3]" in specs[0].label

    both = _grid_specs([f"{START}=3,5", f"{SCALE}=0.0005,0.001,2"], seeds=[1, 2])
    points = {tuple(s.grid.values()) for s in both}
    assert points == {(k, a) for k in (3, 5) for a in (0.0005, 0.001, 2.0)}  # a whole number for a float key
    assert len(both) == 2 * 3 * 2 and len({s.run_id for s in both}) == 12
    # the transfer run's official start layer is 9 (its cross-dataset variant): that point is the plain run
    transfer = _grid_specs([f"{START}=5,9"], protocol="cross_dataset", datasets=["dtd"])
    assert [s.grid_plain for s in transfer] == [False, True]


def test_keys_of_one_method_leave_the_others_as_they_are():
    specs = _grid_specs([f"{START}=3,5"], methods=("mma", "zsclip"))
    zs = [s for s in specs if s.method == "zsclip"]
    assert len(zs) == 1 and zs[0].grid == {} and len(specs) == 3


@pytest.mark.parametrize("item, message", [
    ("TRAINER.MMADAPTER.ADAPTER_STRT=3,5", "Non-existent key"),
    (f"{START}=3,5.5", "Type mismatch"),
    ("TRAINER.MMADAPTER.SHARED=yes", "Type mismatch"),
    ("SPEED.ENABLED=True,False", "does not change a run's numbers"),
    ("SEED=1,2", "use --seeds"),
    ("TRAINER.COOP.N_CTX=4,8", "an option of coop, which is not among --methods"),
    (f"{START}=3,3", "lists a value twice"),
    (f"{START}", "KEY=VALUE1,VALUE2"),
])
def test_bad_grids_are_refused_before_anything_runs(item, message):
    with pytest.raises(grid.GridError, match=message):
        _grid_specs([item])


def test_a_key_in_both_opts_and_grid_and_bad_references_are_refused():
    with pytest.raises(grid.GridError, match="also given in --opts"):
        _grid_specs([f"{START}=3,5"], opts=[START, "7"])
    with pytest.raises(grid.GridError, match="not a key of the grid"):
        grid.parse_reference("ADAPTER_SCALE=0.001", [START])
    assert grid.parse_reference("ADAPTER_START=5", [START]).point == {START: 5}
    assert grid.parse_reference("coop").method == "coop"


# -- tables from hand-made records -----------------------------------------------------------------
N = 200  # test images per evaluation
ACCURACY = {  # (start, dataset, split) -> accuracy of seed 1; seeds 2 and 3 add 1 and 2 points
    (3, "eurosat", "base"): 60, (3, "eurosat", "novel"): 50, (3, "dtd", "base"): 70, (3, "dtd", "novel"): 40,
    (5, "eurosat", "base"): 60, (5, "eurosat", "novel"): 50, (5, "dtd", "base"): 70, (5, "dtd", "novel"): 40,
    (7, "eurosat", "base"): 70, (7, "eurosat", "novel"): 50, (7, "dtd", "base"): 80, (7, "dtd", "novel"): 40,
}


def _write(out: Path, spec, world="synthetic", with_predictions=True, offset=0):
    """A finished record of ``spec`` whose evaluation i gets the first round(acc * N) images right."""
    start = spec.config["TRAINER"]["MMADAPTER"]["ADAPTER_START"]
    metrics, kept = {}, {}
    for ev in spec.evals:
        accuracy = ACCURACY[(start, spec.dataset, ev.name)] + (spec.seed - 1) + offset
        labels = np.arange(N) % 5
        preds = np.where(np.arange(N) < accuracy * N // 100, labels, (labels + 1) % 5)
        metrics[ev.name] = {**classification_metrics(labels, preds), "n_classes": 5}
        kept[ev.name] = predictions.Predictions(preds, labels, f"{spec.dataset}-{ev.name}")
    name = None
    if with_predictions:
        name = predictions.relative_path(spec)
        predictions.write(out / name, kept)
    record = records.finished(spec, method_version=spec.method_version, world=world,
                              evals=[e.__dict__ for e in spec.evals], metrics=metrics, train={"steps": 1},
                              compute={}, timings={"train_s": 1.0}, effective_input_size=[32, 32], software={},
                              code_revision="test", predictions=name)
    store.write_json_atomic(store.record_path(out, spec), record)
    return record


def _records(tmp_path):
    out = tmp_path / "out"
    specs = _grid_specs([f"{START}=3,7"], datasets=["eurosat", "dtd"], seeds=[1, 2, 3])
    for spec in specs:
        _write(out, spec)
    # the official point, run without --grid: it joins the ablation as its own values
    for spec in protocols.expand("base2novel", methods=["mma"], datasets=["eurosat", "dtd"], seeds=[1, 2, 3],
                                 **COMMON):
        _write(out, spec)
    # another recipe (more epochs) is not a point of this grid
    for spec in protocols.expand("base2novel", methods=["mma"], datasets=["eurosat", "dtd"], seeds=[1],
                                 opts=["OPTIM.MAX_EPOCH", "9"], **COMMON):
        _write(out, spec)
    return out


def test_ablation_table_rows_averages_std_and_intervals(tmp_path):
    out = _records(tmp_path)
    ref = grid.parse_reference("ADAPTER_START=5", [START])
    found, paths = ablations.build_ablations(out, ["base2novel"], ref)
    (ablation,) = found
    assert ablation.name == "ablation-base2novel-synthetic" and ablation.keys == [START]
    avg = ablation.cells[ablation.cells["dataset"] == "average"].set_index([START, "metric"])
    assert sorted({k for k, _ in avg.index}) == [3, 5, 7]  # the plain runs are the point 5
    # Base of the start-7 row: per dataset the seed mean (70+1, 80+1), then the mean over datasets
    assert avg.loc[(7, "base"), "value"] == pytest.approx(76.0)
    assert avg.loc[(7, "novel"), "value"] == pytest.approx(46.0)
    assert avg.loc[(7, "hm"), "value"] == pytest.approx(2 * 76 * 46 / (76 + 46))
    # seed std: the per-seed averages are 75, 76, 77
    assert avg.loc[(7, "base"), "std"] == pytest.approx(np.std([75, 76, 77]))
    assert avg.loc[(7, "hm"), "std"] == pytest.approx(np.std([2 * b * n / (b + n) for b, n in
                                                                ((75, 45), (76, 46), (77, 47))]))
    # against the reference: start 7 gains exactly 10 Base points on the same images, every seed
    assert avg.loc[(7, "base"), "delta"] == pytest.approx(10.0) and avg.loc[(7, "base"), "low"] > 0
    assert avg.loc[(7, "novel"), ["delta", "low", "high"]].tolist() == [0.0, 0.0, 0.0]
    assert avg.loc[(3, "base"), ["delta", "low", "high"]].tolist() == [0.0, 0.0, 0.0]  # the same predictions
    assert avg.loc[(5, "base"), "reference"]
    per_dataset = ablation.cells[(ablation.cells["dataset"] == "dtd") & (ablation.cells["metric"] == "base")]
    assert per_dataset.set_index(START).loc[7, "value"] == pytest.approx(81.0)
    shown = ablation.shown.set_index("ADAPTER_START")
    assert shown.loc["7", "Base"] == f"76.00 ± {np.std([75, 76, 77]):.2f}" and shown.loc["5", "ΔBase [95% CI]"] == "reference"
    assert shown.loc["7", "ΔBase [95% CI]"].startswith("+10.00 [")
    # files: the markdown and the per-dataset CSV, and the plot
    assert {p.name for p in paths} == {"ablation-base2novel-synthetic.md", "ablation-base2novel-synthetic.csv",
                                       "ablation-base2novel-synthetic.png"}
    csv = pd.read_csv(out / "tables" / "ablation-base2novel-synthetic.csv")
    assert set(csv["dataset"]) == {"eurosat", "dtd", "average"} and len(csv) == 3 * 3 * 3
    assert "paired-bootstrap 95% interval" in (out / "tables" / "ablation-base2novel-synthetic.md").read_text()
    assert (out / "plots" / "ablation-base2novel-synthetic.png").stat().st_size > 10_000


def test_rows_without_prediction_files_have_no_interval(tmp_path):
    out = tmp_path / "out"
    for spec in _grid_specs([f"{START}=5,7"], seeds=[1, 2]):
        _write(out, spec, with_predictions=spec.grid[START] == 5)  # 7: as a record made before the files
    ref = grid.parse_reference(f"{START}=5", [START])
    (ablation,), _ = ablations.build_ablations(out, ["base2novel"], ref)
    row = ablation.shown.set_index("ADAPTER_START").loc["7"]
    assert row["ΔBase [95% CI]"] == "+10.00 (no interval)"
    assert any("no per-image predictions" in note for note in ablation.notes)


def test_table_command_shows_ablations_and_method_references(tmp_path, capsys):
    out = _records(tmp_path)
    code = main(["table", "--output", str(out), "--reference", "ADAPTER_START=5"])
    text = capsys.readouterr().out
    assert code == 0 and "Ablation: Base-to-novel" in text and "+10.00 [" in text
    # the ordinary table holds the plain runs only: no grid point other than the official one; the
    # plain runs made with another schedule (--opts OPTIM.MAX_EPOCH 9) are another computation: own row
    plain = pd.read_csv(out / "tables" / "base2novel-synthetic.csv")
    assert set(plain["method"]) == {"mma [MAX_EPOCH=5]", "mma [MAX_EPOCH=9]"}
    assert plain.set_index(["method", "dataset"]).loc[("mma [MAX_EPOCH=5]", "eurosat"), "base"] == pytest.approx(61.0)
    assert main(["table", "--output", str(out), "--reference", "nosuch"]) == 2
    assert "Unknown method 'nosuch'" in capsys.readouterr().out
    # against a reference method: zero-shot CLIP's runs, 5 points below MMA's on the same images
    for spec in protocols.expand("base2novel", methods=["zsclip"], datasets=["eurosat", "dtd"], seeds=[1, 2, 3],
                                 **COMMON):
        _write(out, spec, offset=-5)
    assert main(["table", "--output", str(out), "--reference", "zsclip"]) == 0
    assert "Against zsclip" in capsys.readouterr().out
    versus = pd.read_csv(out / "tables" / "base2novel-synthetic-vs-zsclip.csv")
    versus = versus[versus["method"] == "mma [MAX_EPOCH=5]"].set_index(["dataset", "metric"])
    assert versus.loc[("average", "base"), "delta"] == pytest.approx(5.0) and versus.loc[("average", "base"), "low"] > 0
    assert versus.loc[("dtd", "novel"), "delta"] == pytest.approx(5.0)


# -- end to end through the command line -----------------------------------------------------------
def test_grid_sweep_end_to_end_resumed(tmp_path, synthetic_root, capsys):
    out = tmp_path / "out"
    common = ["--methods", "mma", "--root", str(synthetic_root), "--clip", "tiny-clip-12", "--datasets", "eurosat",
              "--seeds", "1", "--output", str(out), "-q", "--opts", "OPTIM.MAX_EPOCH", "1"]
    assert main(common) == 0  # the plain run first
    capsys.readouterr()
    sweep = common + ["--grid", f"{START}=5,9", "--reference", "ADAPTER_START=5"]
    assert main(sweep + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "Grid: 2 points" in plan and "[ADAPTER_START=9]" in plan and "1 done" in plan
    assert main(sweep) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "1 done, 1 already finished" in text  # the official point is the plain run: not repeated
    assert "Ablation: Base-to-novel" in text and "reference" in text
    assert main(sweep) == 0 and "0 done, 2 already finished" in capsys.readouterr().out
    found = {r["id"]: r for r in store.iter_records(out)}
    nine = next(r for r in found.values() if r.get("grid"))
    assert nine["grid"] == {START: 9} and nine["grid_plain"] is False
    assert nine["config"]["TRAINER"]["MMADAPTER"]["ADAPTER_START"] == 9
    for record in found.values():  # predictions beside each record agree with its metrics
        kept = predictions.load(out, record)
        for name, metric in record["metrics"].items():
            assert int(kept[name].correct.sum()) == metric["n_correct"] and len(kept[name].pred) == metric["n_images"]
    table = (out / "tables" / "ablation-base2novel-synthetic.md").read_text()
    assert "| mma" in table and "ΔHM [95% CI]" in table
    assert (out / "plots" / "ablation-base2novel-synthetic.png").is_file()
