"""Tables never merge two computations: records that differ in their run identity other than
the seed (the backbone, an ``--opts`` value) are separate, labelled rows of every table
(base-to-novel, cross-dataset, domain generalisation, few-shot, the comparisons against a
reference method, the ablations, the rank agreement).  The records are those real run specs
give (``benchmark.protocols``), written into a results folder by the store's writer."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd
import pytest

from benchmark import (ablations, backbone, bootstrap, comparisons, display, grid, predictions, protocols,
                       record_settings, records, store, tables)
from datasets.catalog import CROSS_DATASET_TARGETS, DG_DATASETS

N = 200  # test images per evaluation: accuracies in steps of 0.5
BIG, SMALL = "tiny-clip-12", "tiny-clip-1"  # two backbones (two sets of weights)
START = "TRAINER.MMADAPTER.ADAPTER_START"
B2N_COLUMNS = ["method", "dataset", "base", "base_std", "novel", "novel_std", "hm", "seeds", "paper_base",
               "paper_novel", "paper_hm", "delta_hm"]
ACCURACY_COLUMNS = ["method", "shots", "dataset", "accuracy", "std", "seeds", "paper", "delta"]

pytestmark = pytest.mark.usefixtures("wide_console")


@functools.lru_cache(maxsize=None)
def _backbone_id(name: str) -> str:
    return backbone.backbone_fingerprint(name)


def _common(name: str = BIG) -> dict:
    return dict(root="unused", backbone=name, backbone_id=_backbone_id(name))


def _write(out, spec, accuracy: dict, world: str = "synthetic") -> dict:
    """The finished record of ``spec`` (and its predictions): evaluation ``E`` gets the first
    ``accuracy[E]`` percent of the same ``N`` test images right."""
    metrics, kept = {}, {}
    labels = np.arange(N) % 5
    for ev in spec.evals:
        right = int(round(accuracy[ev.name] * N / 100))
        pred = np.where(np.arange(N) < right, labels, (labels + 1) % 5)
        metrics[ev.name] = {"accuracy": 100.0 * right / N, "n_images": N, "n_correct": right, "n_classes": 5}
        kept[ev.name] = predictions.Predictions(pred, labels, f"{spec.dataset}-{ev.name}")
    name = predictions.relative_path(spec)
    predictions.write(out / name, kept)
    record = records.finished(spec, method_version=spec.method_version, world=world,
                              evals=[dataclasses.asdict(e) for e in spec.evals], metrics=metrics,
                              train={"steps": 1}, compute={}, timings={"train_s": 1.0},
                              effective_input_size=[32, 32], software={}, code_revision="test", predictions=name)
    store.write_json_atomic(store.record_path(out, spec), record)
    return record


def _b2n(out, method, datasets, seeds, base, novel, name=BIG, world="synthetic", opts=()):
    """Base-to-novel records: seed s adds s - 1 points to ``base`` and ``novel``."""
    for spec in protocols.base2novel([method], datasets, seeds, 16, opts=list(opts), **_common(name)):
        _write(out, spec, {"base": base + spec.seed - 1, "novel": novel + spec.seed - 1}, world)


# -- the ordinary tables ---------------------------------------------------------------------------
def test_two_backbones_are_two_rows_of_the_base_to_novel_table(tmp_path, capsys):
    out = tmp_path / "out"
    _b2n(out, "zsclip", ["eurosat"], [1], 60.0, 40.0, BIG, world="real")
    _b2n(out, "zsclip", ["eurosat"], [1], 30.0, 20.0, SMALL, world="real")
    built = tables.build_tables(out, ["base2novel"])
    table = built.shown[("base2novel", "real")]
    rows = table[table["dataset"] == "eurosat"].set_index("method")
    big, small = f"zsclip [backbone={BIG}]", f"zsclip [backbone={SMALL}]"
    assert sorted(rows.index) == sorted([big, small])  # nothing dropped, nothing merged
    assert rows["seeds"].tolist() == [1, 1]
    assert rows.loc[big, ["base", "novel"]].tolist() == pytest.approx([60.0, 40.0])
    assert rows.loc[small, ["base", "novel"]].tolist() == pytest.approx([30.0, 20.0])
    assert rows.loc[small, "hm"] == pytest.approx(24.0)
    # the registered name stays apart from the label: the published CLIP numbers beside both rows
    assert set(rows["method_name"]) == {"zsclip"} and set(rows["setting"]) == {f"backbone={BIG}", f"backbone={SMALL}"}
    paper = tables.load_paper("base2novel")
    clip = paper[(paper["method"] == "CLIP") & (paper["dataset"] == "eurosat")]["hm"].item()
    assert rows["paper_hm"].tolist() == [clip, clip]
    note = "zsclip: records of 2 settings (backbone) are shown as separate rows."
    md = (out / "tables" / "base2novel.md").read_text()
    assert note in md and f"| {small}" in md
    assert built.settings[("base2novel", "real")] == [note]
    assert set(pd.read_csv(out / "tables" / "base2novel.csv")["method"]) == {big, small}
    display.show_table("base2novel", table, "Base-to-novel")
    shown = capsys.readouterr().out
    assert note in shown and f"Base-to-novel: {small}" in shown


def test_two_backbones_are_two_rows_of_the_cross_dataset_dg_and_few_shot_tables(tmp_path):
    out = tmp_path / "out"
    targets = [*CROSS_DATASET_TARGETS, *DG_DATASETS]
    for name, accuracy in ((BIG, 50.0), (SMALL, 40.0)):
        (spec,) = protocols.transfer(["zsclip"], targets, [1], 16, **_common(name))
        _write(out, spec, {e.name: accuracy for e in spec.evals}, world="real")
        for spec in protocols.few_shot(["coop"], ["eurosat"], [1], [1, 2], **_common(name)):
            _write(out, spec, {"test": accuracy + spec.shots}, world="real")
    built = tables.build_tables(out, ["cross_dataset", "domain_generalization", "few_shot"])
    big, small = f"zsclip [backbone={BIG}]", f"zsclip [backbone={SMALL}]"
    for protocol in ("cross_dataset", "domain_generalization"):
        table = built.shown[(protocol, "real")]
        average = table[table["dataset"] == "average"].set_index("method")
        assert average.loc[big, "accuracy"] == pytest.approx(50.0)
        assert average.loc[small, "accuracy"] == pytest.approx(40.0)
        assert average["seeds"].tolist() == [1, 1]
        paper = table.pivot(index="dataset", columns="method", values="paper")  # CLIP's, beside both rows
        assert paper[big].notna().sum() > 4 and paper[big].equals(paper[small])
        md = (out / "tables" / f"{protocol}.md").read_text()
        assert "zsclip: records of 2 settings (backbone) are shown as separate rows." in md
        assert f"| {small}" in md and f"| {big}" in md
    few = built.shown[("few_shot", "real")]
    cells = few[few["dataset"] == "eurosat"].set_index(["method", "shots"])
    assert len(cells) == 4 and (cells["seeds"] == 1).all()
    assert cells.loc[(f"coop [backbone={SMALL}]", 2), "accuracy"] == pytest.approx(42.0)
    assert cells.loc[(f"coop [backbone={BIG}]", 1), "accuracy"] == pytest.approx(51.0)
    assert "coop: records of 2 settings (backbone)" in (out / "tables" / "few_shot.md").read_text()


def test_two_values_of_an_opts_key_are_two_rows(tmp_path):
    out = tmp_path / "out"
    _b2n(out, "coop", ["eurosat", "dtd"], [1, 2], 70.0, 50.0)
    _b2n(out, "coop", ["eurosat", "dtd"], [1, 2], 60.0, 30.0, opts=["OPTIM.LR", "0.01"])
    built = tables.build_tables(out, ["base2novel"])
    table = built.shown[("base2novel", "synthetic")]
    average = table[table["dataset"] == "average"].set_index("method")
    assert sorted(average.index) == ["coop [LR=0.002]", "coop [LR=0.01]"]
    assert average.loc["coop [LR=0.01]", ["base", "novel"]].tolist() == pytest.approx([60.5, 30.5])
    assert average.loc["coop [LR=0.002]", ["base", "novel"]].tolist() == pytest.approx([70.5, 50.5])
    assert (table["seeds"] == 2).all()
    assert "coop: records of 2 settings (LR) are shown as separate rows." in \
        (out / "tables" / "base2novel-synthetic.md").read_text()


def test_without_a_conflict_the_table_is_as_before_and_one_more_backbone_adds_a_row(tmp_path):
    out = tmp_path / "out"
    _b2n(out, "zsclip", ["eurosat", "dtd"], [1, 2], 60.0, 40.0)
    _b2n(out, "coop", ["eurosat", "dtd"], [1, 2], 70.0, 50.0)
    built = tables.build_tables(out, ["base2novel"])
    table = built.shown[("base2novel", "synthetic")]
    assert list(table.columns) == B2N_COLUMNS and set(table["method"]) == {"zsclip", "coop"}
    euro = table[(table["method"] == "coop") & (table["dataset"] == "eurosat")].iloc[0]
    assert [euro.base, euro.novel, euro.seeds] == [pytest.approx(70.5), pytest.approx(50.5), 2]
    assert euro.base_std == pytest.approx(0.5)
    assert built.settings == {} and record_settings.settings_notes(table) == []
    md = (out / "tables" / "base2novel-synthetic.md").read_text()
    assert "settings" not in md and "[" not in md.split("\n\n")[1]  # no labelled row
    csv = pd.read_csv(out / "tables" / "base2novel-synthetic.csv")
    assert list(csv.columns) == B2N_COLUMNS
    # the table made from a records frame of the columns the tables read before is the same
    frame = tables.records_frame(store.iter_records(out)).drop(columns=["method_name", "setting"])
    pd.testing.assert_frame_equal(tables.base2novel_table(frame), table)

    # zero-shot CLIP on a second backbone: its rows split, coop's stay as they were
    _b2n(out, "zsclip", ["eurosat"], [1], 20.0, 10.0, SMALL)
    again = tables.build_tables(out, ["base2novel"]).shown[("base2novel", "synthetic")]
    assert list(again.columns[:3]) == ["method", "method_name", "setting"]
    coop = again[again["method"] == "coop"].drop(columns=["method_name", "setting"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(coop, table[table["method"] == "coop"].reset_index(drop=True))
    big = again[again["method"] == f"zsclip [backbone={BIG}]"].set_index("dataset")
    assert big.loc["eurosat", "base"] == pytest.approx(60.5) and big.loc["eurosat", "seeds"] == 2
    small = again[again["method"] == f"zsclip [backbone={SMALL}]"].set_index("dataset")
    assert list(small.index) == ["eurosat", "average"] and small.loc["eurosat", "base"] == pytest.approx(20.0)


def test_records_of_older_versions_and_unregistered_methods(tmp_path):
    """Records without ``backbone_id``, ``evals``, ``config`` or a registered method table as
    before; one that only an older record lacks a key of cannot be told apart: refused."""
    out = tmp_path / "out"

    def old(method, dataset, seed, base, **extra):
        record = {"id": f"{method}{dataset}{seed}", "status": "ok", "method": method, "protocol": "base2novel",
                  "dataset": dataset, "shots": 16, "seed": seed, "world": "synthetic",
                  "metrics": {"base": {"accuracy": base}, "novel": {"accuracy": base - 20}}, **extra}
        path = out / "records" / method / "base2novel" / dataset / f"shots16-seed{seed}-{record['id']}.json"
        store.write_json_atomic(path, record)
        return record

    old("mma", "eurosat", 1, 80.0)
    old("mma", "eurosat", 2, 90.0)
    gone = {"TRAINER": {"NAME": "GONE", "GONE": {"DEPTH": 2}, "COOP": {"N_CTX": 4}}, "SEED": 1}
    old("gone_plugin", "eurosat", 1, 50.0, config=gone)
    old("gone_plugin", "eurosat", 2, 60.0, config={**gone, "SEED": 2, "TRAINER": {**gone["TRAINER"],
                                                                                 "COOP": {"N_CTX": 8}}})
    old("gone_plugin", "dtd", 1, 40.0, config={**gone, "TRAINER": {**gone["TRAINER"], "GONE": {"DEPTH": 3}}})
    old("gone_plugin", "dtd", 2, 30.0, config={**gone, "SEED": 2})
    table = tables.build_tables(out, ["base2novel"]).shown[("base2novel", "synthetic")].set_index(["method", "dataset"])
    assert table.loc[("mma", "eurosat"), "base"] == pytest.approx(85.0) and table.loc[("mma", "eurosat"), "seeds"] == 2
    # another method's options (COOP) are not part of a run: only the plugin's own DEPTH splits
    assert table.loc[("gone_plugin [DEPTH=2]", "eurosat"), "base"] == pytest.approx(55.0)
    assert table.loc[("gone_plugin [DEPTH=2]", "dtd"), "base"] == pytest.approx(30.0)
    assert table.loc[("gone_plugin [DEPTH=3]", "dtd"), "base"] == pytest.approx(40.0)

    # a new record of a run that an older record (without backbone_id) also holds
    (spec,) = protocols.base2novel(["zsclip"], ["eurosat"], [1], 16, **_common())
    new = _write(out, spec, {"base": 60.0, "novel": 40.0})
    older = {k: v for k, v in new.items() if k not in ("backbone_id", "evals")}
    older["id"] = "0123456789abcdef"
    path = out / "records" / "zsclip" / "base2novel" / "eurosat" / f"shots16-seed2-{older['id']}.json"
    store.write_json_atomic(path, {**older, "seed": 2})  # another seed: one row, as before
    row = tables.build_tables(out, ["base2novel"]).shown[("base2novel", "synthetic")].set_index(
        ["method", "dataset"]).loc[("zsclip", "eurosat")]
    assert row["seeds"] == 2
    store.write_json_atomic(path.with_name(f"shots16-seed1-{older['id']}.json"), older)  # the same seed
    with pytest.raises(record_settings.SettingsError) as refused:
        tables.build_tables(out, ["base2novel"])
    message = str(refused.value)
    assert f"seed1-{older['id']}.json" in message and f"seed1-{new['id']}.json" in message
    assert "backbone_id" in message and "not stored" in message


# -- comparisons, ablations, rank agreement --------------------------------------------------------
def test_comparisons_pair_each_row_with_the_reference_on_its_backbone(tmp_path):
    out = tmp_path / "out"
    datasets = ["eurosat", "dtd"]
    _b2n(out, "zsclip", datasets, [1, 2], 50.0, 40.0, BIG)
    _b2n(out, "mma", datasets, [1, 2], 55.0, 45.0, BIG)
    _b2n(out, "zsclip", datasets, [1, 2], 30.0, 20.0, SMALL)
    _b2n(out, "mma", datasets, [1, 2], 32.0, 21.0, SMALL)
    _b2n(out, "coop", datasets, [1, 2], 51.0, 41.0, BIG)  # one backbone: not split, paired on its own
    _b2n(out, "kgcoop", datasets, [1, 2], 51.0, 41.0, "toy-clip")  # no reference run on its backbone
    shown, paths = comparisons.build_comparisons(out, ["base2novel"], "zsclip")
    frame = pd.read_csv(out / "tables" / "base2novel-synthetic-vs-zsclip.csv")
    pairs = set(zip(frame["method"], frame["reference"]))
    assert pairs == {(f"mma [backbone={b}]", f"zsclip [backbone={b}]") for b in (BIG, SMALL)} | {
        ("coop", f"zsclip [backbone={BIG}]")}
    coop = frame[(frame["method"] == "coop") & (frame["dataset"] == "average")].set_index("metric")
    assert coop.loc["base", "delta"] == pytest.approx(1.0)
    assert coop.loc["base", "reference_value"] == pytest.approx(50.5)
    average = frame[frame["dataset"] == "average"].set_index(["method", "metric"])
    for name, base, novel in ((BIG, 5.0, 5.0), (SMALL, 2.0, 1.0)):
        row = average.loc[f"mma [backbone={name}]"]
        assert row.loc["base", "delta"] == pytest.approx(base) and row.loc["novel", "delta"] == pytest.approx(novel)
        assert row.loc["base", "low"] <= base <= row.loc["base", "high"]  # an interval: the runs were paired
        assert row.loc["base", "value"] == pytest.approx(base + (50.5 if name == BIG else 30.5))
    (name, text, note), = shown
    assert list(text.columns[:2]) == ["Method", "Reference"] and len(text) == 3 * 3
    assert "zsclip: records of 2 settings (backbone)" in note and "mma: records of 2 settings" in note
    md = (out / "tables" / f"{name}.md").read_text()
    assert "zsclip: records of 2 settings (backbone)" in md
    assert "kgcoop (16 shots): no run of zsclip on its backbone, not compared." in md
    assert "\ncoop (16 shots)" not in md  # coop is compared with the reference on its backbone

    # the paired bootstrap itself refuses rows that hold two settings, or runs of two backbones
    found = list(store.iter_records(out))
    mma = [r for r in found if r["method"] == "mma"]
    zero_big = [r for r in found if r["method"] == "zsclip" and r["backbone"] == BIG]
    zero_small = [r for r in found if r["method"] == "zsclip" and r["backbone"] == SMALL]
    with pytest.raises(ValueError, match="different settings"):
        bootstrap.compare_rows(out, "base2novel", mma, zero_big + zero_small)
    with pytest.raises(ValueError, match="two backbones"):
        bootstrap.compare_rows(out, "base2novel", [r for r in mma if r["backbone"] == BIG], zero_small)


def test_ablation_rows_are_one_setting_each(tmp_path):
    out = tmp_path / "out"
    points = grid.parse_grid([f"{START}=3,7"])
    for name, base, gain in ((BIG, 60.0, 10.0), (SMALL, 40.0, 4.0)):
        for spec in grid.expand_grid(points, "base2novel", methods=["mma"], datasets=["eurosat"], seeds=[1, 2],
                                     **_common(name)):
            extra = gain if spec.grid[START] == 7 else 0.0
            _write(out, spec, {"base": base + extra + spec.seed - 1, "novel": base - 20 + spec.seed - 1})
    reference = grid.parse_reference("ADAPTER_START=3", [START])
    (ablation,), _ = ablations.build_ablations(out, ["base2novel"], reference)
    average = ablation.cells[(ablation.cells["dataset"] == "average") & (ablation.cells["metric"] == "base")]
    values = {(m, p): v for m, p, v in zip(average["method"], average[START], average["value"])}
    assert values == {(f"mma [backbone={BIG}]", 3): pytest.approx(60.5),
                      (f"mma [backbone={BIG}]", 7): pytest.approx(70.5),
                      (f"mma [backbone={SMALL}]", 3): pytest.approx(40.5),
                      (f"mma [backbone={SMALL}]", 7): pytest.approx(44.5)}
    assert (average["seeds"] == 2).all()
    deltas = average.set_index(["method", START])["delta"]
    assert deltas.loc[(f"mma [backbone={BIG}]", 7)] == pytest.approx(10.0)  # against its own backbone's point 3
    assert deltas.loc[(f"mma [backbone={SMALL}]", 7)] == pytest.approx(4.0)
    assert len(ablation.shown) == 4 and set(ablation.shown["Method"]) == {f"mma [backbone={BIG}]",
                                                                          f"mma [backbone={SMALL}]"}
    assert "mma: records of 2 settings (backbone) are shown as separate rows." in ablation.notes
    assert "records of 2 settings (backbone)" in (out / "tables" / "ablation-base2novel-synthetic.md").read_text()


def test_rank_agreement_takes_each_row_with_its_methods_published_average(tmp_path):
    out = tmp_path / "out"
    for method, name, accuracy in (("mma", BIG, 70.0), ("coop", BIG, 60.0), ("kgcoop", BIG, 65.0),
                                   ("zsclip", BIG, 50.0), ("zsclip", SMALL, 40.0)):
        (spec,) = protocols.transfer([method], list(DG_DATASETS), [1], 16, **_common(name))
        _write(out, spec, {e.name: accuracy for e in spec.evals}, world="toy")
    built = tables.build_tables(out, ["domain_generalization"])
    agreed = built.agreement[("domain_generalization", "toy")]
    clip = tables.load_paper("domain_generalization").query("method == 'CLIP' and dataset == 'average'")["accuracy"]
    assert agreed.ours[f"zsclip [backbone={SMALL}]"] == pytest.approx(40.0)
    assert agreed.ours[f"zsclip [backbone={BIG}]"] == pytest.approx(50.0)
    assert agreed.published[f"zsclip [backbone={SMALL}]"] == agreed.published[f"zsclip [backbone={BIG}]"] == clip.item()
    assert len(agreed.ours) == 5  # every row, each once
