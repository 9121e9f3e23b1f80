"""Hostile input against the README's Guarantees, second round, on real files: damaged
records, classes without training images, a broken ImageNet folder, a bad backbone file
or device, an output folder that cannot be written, dataset name spellings, a binary
config file, LaTeX tables and the modes of written files."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark import store, tables
from benchmark.cli import main

REPO = Path(__file__).resolve().parent.parent
SWEEP = ("--methods", "zsclip", "--datasets", "eurosat", "--seeds", "1")


pytestmark = pytest.mark.usefixtures("wide_console")


def _cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).replace("│", " ").split())


@pytest.fixture
def eurosat_root(tmp_path):
    from datasets.synthetic import write_synthetic_root

    return write_synthetic_root(tmp_path / "data", ["eurosat"])


# -- damaged records --------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = json.loads(path.read_text())
    if how == "metrics_null":
        data["metrics"] = None
        path.write_text(json.dumps(data))
    elif how == "evaluation_string":
        data["metrics"]["base"] = "92.5"
        path.write_text(json.dumps(data))
    else:  # cut by hand
        text = path.read_text()
        path.write_text(text[: len(text) // 2])


@pytest.mark.parametrize("how", ["metrics_null", "evaluation_string", "truncated"])
def test_a_damaged_record_is_reported_set_aside_and_run_again(eurosat_root, tmp_path, capsys, how):
    out = tmp_path / "out"
    args = ("--root", str(eurosat_root), *SWEEP, "--output", str(out))
    assert _cli(capsys, *args)[0] == 0
    (path,) = (out / "records").rglob("*.json")
    good = json.loads(path.read_text())
    _damage(path, how)

    code, text = _cli(capsys, "table", "--output", str(out))  # the table names it and builds without it
    assert code == 1 and "1 damaged record(s) skipped" in text and str(path) in text

    code, text = _cli(capsys, *args)  # the sweep sets it aside and runs it again
    assert code == 0 and "1 done" in text and f"the record {path} is damaged" in text
    rerun = json.loads(path.read_text())
    # exact: the run again in this process, the same operations on the same data (bit identity is the claim)
    assert rerun["status"] == "ok" and rerun["metrics"] == {k: dict(v, seconds=rerun["metrics"][k]["seconds"])
                                                            for k, v in good["metrics"].items()}
    (moved,) = [p for p in (out / "quarantine").rglob("*.json") if not p.name.endswith(".reason.json")]
    assert moved.name == path.name and moved.read_text() != path.read_text()
    reason = json.loads(moved.with_suffix(".reason.json").read_text())
    assert reason["record"] == str(path) and reason["reason"]

    code, text = _cli(capsys, "table", "--output", str(out))
    assert code == 0 and "damaged record" not in text


def test_tables_state_how_many_records_were_skipped(eurosat_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(capsys, "--root", str(eurosat_root), "--methods", "zsclip,clip_adapter", "--datasets", "eurosat",
                "--seeds", "1", "--output", str(out), "--opts", "OPTIM.MAX_EPOCH", "1")[0] == 0
    damaged = next(p for p in (out / "records").rglob("*.json") if "clip_adapter" in str(p))
    _damage(damaged, "metrics_null")
    code, text = _cli(capsys, "table", "--output", str(out))
    assert code == 0 and "1 damaged record(s) skipped" in text and "zsclip" in text
    markdown = (out / "tables" / "base2novel-synthetic.md").read_text()
    assert "1 damaged record(s) skipped" in markdown and str(damaged) in markdown


# -- classes without training images ------------------------------------------------------------
def _drop_from_train(root: Path, classname: str) -> int:
    """Remove a class from the split file's train and val lists; returns its test images."""
    (split,) = (root / "eurosat").glob("split_*.json")
    data = json.loads(split.read_text())
    for key in ("train", "val"):
        data[key] = [row for row in data[key] if row[2] != classname]
    split.write_text(json.dumps(data))
    return sum(row[2] == classname for row in data["test"])


def test_a_class_without_training_images_is_reported_and_recorded(eurosat_root, tmp_path, capsys):
    from datasets.build import build_dataset

    full = build_dataset("eurosat", eurosat_root, subsample="new")
    victim = full.classnames[-1]  # a novel class
    n_before = len(full.test) + len(build_dataset("eurosat", eurosat_root, subsample="base").test)
    n_test = _drop_from_train(eurosat_root, victim)
    assert n_test > 0

    code, text = _cli(capsys, "check", "--root", str(eurosat_root), "--datasets", "eurosat")
    assert code == 1 and "incomplete" in text and "absent from train" in text and victim in text
    assert f"their {n_test} test images" in text

    out = tmp_path / "out"
    code, text = _cli(capsys, "--root", str(eurosat_root), *SWEEP, "--output", str(out))
    assert code == 0 and victim in text and "no training images" in text  # the sweep warns up front
    (record,) = store.iter_records(out)
    assert record["train"]["classes_without_training_images"] == {victim: n_test}
    # as in the reference code the classes come from the training labels: the novel half
    # is drawn without the class, and its test images are left out, said and recorded
    novel = build_dataset("eurosat", eurosat_root, subsample="new")
    assert victim not in novel.classnames and record["metrics"]["novel"]["n_images"] == len(novel.test)
    base = build_dataset("eurosat", eurosat_root, subsample="base")
    assert record["metrics"]["base"]["n_images"] == len(base.test)
    assert len(base.test) + len(novel.test) + n_test == n_before

    # where the whole class list is used, the labels would not match: stop before any run
    code, text = _cli(capsys, "--root", str(eurosat_root), "--methods", "zsclip", "--protocol", "few_shot",
                      "--datasets", "eurosat", "--seeds", "1", "--shots", "1", "--output", str(tmp_path / "few"))
    assert code == 2 and victim in text and "no training images" in text
    assert not (tmp_path / "few" / "records").exists()


def test_base_novel_test_images_are_only_left_out_with_a_warning(eurosat_root, caplog):
    from datasets.build import build_dataset

    before = {s: len(build_dataset("eurosat", eurosat_root, subsample=s).test) for s in ("base", "new")}
    victim = build_dataset("eurosat", eurosat_root).classnames[0]
    n_test = _drop_from_train(eurosat_root, victim)
    after = {s: build_dataset("eurosat", eurosat_root, subsample=s) for s in ("base", "new")}
    assert sum(len(a.test) for a in after.values()) == sum(before.values()) - n_test
    assert all(a.classes_without_training_images == {victim: n_test} for a in after.values())
    assert sum("no training images" in r.getMessage() and victim in r.getMessage() for r in caplog.records) == 2


# -- ImageNet's cache of file lists -----------------------------------------------------------
@pytest.fixture
def imagenet_root(tmp_path):
    from datasets.synthetic import write_synthetic_root

    return write_synthetic_root(tmp_path / "data", ["imagenet"])


def test_check_never_writes_imagenet_cache_and_a_broken_scan_is_not_cached(imagenet_root, capsys):
    cache = imagenet_root / "imagenet" / "preprocessed.pkl"
    val = imagenet_root / "imagenet" / "images" / "val"
    victim = sorted(p for p in val.iterdir() if p.is_dir())[3]
    shutil.rmtree(victim)  # a partly extracted archive: one class folder of val missing

    code, text = _cli(capsys, "check", "--root", str(imagenet_root), "--datasets", "imagenet")
    assert code == 1 and "imagenet incomplete" in text and not cache.exists()

    from datasets.base import DatasetError
    from datasets.build import build_dataset

    with pytest.raises(DatasetError, match="inconsistent splits"):
        build_dataset("imagenet", imagenet_root)
    assert not cache.exists()  # the broken scan left nothing behind to outlive the fix

    code, text = _cli(capsys, "check", "--root", str(imagenet_root), "--datasets", "imagenet")
    assert code == 1 and not cache.exists()


def test_a_stale_imagenet_cache_is_named_in_the_error(imagenet_root):
    from datasets.base import DatasetError, read_dassl_pickle, write_dassl_pickle
    from datasets.build import build_dataset

    cache = imagenet_root / "imagenet" / "preprocessed.pkl"
    build_dataset("imagenet", imagenet_root)
    assert cache.is_file()
    lists = read_dassl_pickle(cache, imagenet_root / "imagenet")
    first = lists["train"][0].label
    lists["train"] = [d for d in lists["train"] if d.label != first]  # a cache of a broken scan
    write_dassl_pickle(lists, cache)
    with pytest.raises(DatasetError) as caught:
        build_dataset("imagenet", imagenet_root)
    assert str(cache) in str(caught.value) and "delete that file" in str(caught.value)


# -- backbone, device and output checked once, before any run -----------------------------------
def test_a_bad_backbone_file_fails_once_before_any_run(eurosat_root, tmp_path, capsys):
    bad = tmp_path / "ViT-B-16.pt"
    bad.write_bytes(b"not a checkpoint" * 100)
    out = tmp_path / "out"
    code, text = _cli(capsys, "--root", str(eurosat_root), "--methods", "zsclip,coop", "--datasets", "eurosat",
                      "--seeds", "1,2", "--clip", str(bad), "--output", str(out))
    assert code == 2 and str(bad) in text and len(re.findall(r"(?:^| )Error: ", text)) == 1
    assert not (out / "records").exists()


def test_a_device_this_machine_lacks_fails_before_any_run(eurosat_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, text = _cli(capsys, "--root", str(eurosat_root), *SWEEP, "--device", "cuda:99", "--output", str(out))
    assert code == 2 and "cuda:99" in text and "--device" in text
    assert not (out / "records").exists()


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process may not create files in.  Root ignores file modes, so as root
    a folder of the kernel's sysfs is used (EPERM, or EROFS where it is mounted read-only)."""
    if os.geteuid() == 0:
        return Path("/sys/fs")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked


@pytest.mark.parametrize("case", ["no_permission", "file_in_the_way"])
def test_an_output_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path, capsys, case):
    if case == "no_permission":
        out = _unwritable_folder(tmp_path) / "results"
    else:
        (tmp_path / "results").write_text("a file, not a folder")
        out = tmp_path / "results" / "runs"
    code, text = _cli(capsys, "--world", "synthetic", *SWEEP, "--output", str(out))
    assert code == 2 and f"Cannot write {out}" in text and "--output" in text, text
    assert "Traceback" not in text and not out.exists()


def test_a_full_disk_on_a_fresh_output_stops_with_the_path_and_the_fix(tmp_path):
    """The file-size limit makes writes fail as a full disk does (errno EFBIG, not ENOSPC)."""
    out = tmp_path / "out"
    data = tmp_path / "data"
    from datasets.synthetic import write_synthetic_root

    write_synthetic_root(data, ["eurosat"])
    limit = 4096  # smaller than a record

    def limited():
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "run.py", "--root", str(data), "--methods", "zsclip", "--datasets",
                           "eurosat", "--seeds", "1", "--output", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=limited, env={**os.environ, "COLUMNS": "400"})
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, text
    assert "Cannot write" in text and str(out) in text and "ulimit" in text, text
    assert "PytorchStreamWriter" not in text and "Traceback" not in text
    assert not list(out.rglob("*.tmp"))


# -- names, config files, LaTeX, modes --------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["OxfordPets", "oxfordpets", "Oxford-Pets"])
def test_dataset_names_in_official_or_plain_spelling_are_accepted(tmp_path, capsys, spelling):
    code, text = _cli(capsys, "--world", "synthetic", "--methods", "zsclip", "--datasets", spelling, "--seeds", "1",
                      "--output", str(tmp_path / "out"), "--dry-run")
    assert code == 0 and "zsclip/base2novel/oxford_pets/shots16/seed1" in text


def test_an_unknown_dataset_is_blamed_not_the_protocol(tmp_path, capsys):
    code, text = _cli(capsys, "--world", "synthetic", "--datasets", "oxford_petz", "--output", str(tmp_path / "o"))
    assert code == 2 and "Unknown dataset 'oxford_petz'" in text and "oxford_pets" in text and "protocol" not in text


def test_a_binary_config_file_is_named(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    code, text = _cli(capsys, "--world", "synthetic", *SWEEP, "--config-file", str(binary),
                      "--output", str(tmp_path / "out"))
    assert code == 2 and str(binary) in text and "not a text file" in text


def test_latex_sets_only_our_best_result_in_bold():
    rows = [{"method": m, "dataset": d, "base": b, "base_std": 0.0, "novel": n, "novel_std": 0.0,
             "hm": 2 * b * n / (b + n), "seeds": 3, "paper_base": 99.0, "paper_novel": 99.0, "paper_hm": 99.0,
             "delta_hm": 50.0 if m == "coop" else -1.0}
            for m, d, b, n in [("coop", "eurosat", 90.0, 50.0), ("mma", "eurosat", 80.0, 70.0),
                               ("coop", "dtd", 60.0, 40.0), ("mma", "dtd", 65.0, 30.0)]]
    latex = tables.latex_table(tables.display_frame(pd.DataFrame(rows)))
    bold = [line for line in latex.splitlines() if "textbf" in line]
    assert "\\textbf{99" not in latex and "\\textbf{+50" not in latex  # published numbers and Δ
    # best per dataset: coop's base on eurosat, mma's novel and HM there; coop's novel on dtd
    assert "\\textbf{90.00" in latex and "\\textbf{70.00" in latex and "\\textbf{40.00" in latex
    assert "\\textbf{80.00" not in latex and "\\textbf{65.00" in latex and len(bold) == 4


def test_records_checkpoints_and_caches_are_readable_by_the_group(eurosat_root, tmp_path, capsys):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _cli(capsys, "--root", str(eurosat_root), "--methods", "zsclip,coop", "--datasets", "eurosat",
                    "--seeds", "1", "--output", str(out), "--save-checkpoints", "--opts", "OPTIM.MAX_EPOCH", "1")[0] == 0
    finally:
        os.umask(old)
    from benchmark.files import FILE_MODE

    written = [p for p in list(out.rglob("*")) + list((eurosat_root / "eurosat").rglob("*.pkl")) if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".json", ".pt", ".pkl"} <= kinds
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & FILE_MODE & 0o044 == FILE_MODE & 0o044, f"{path}: {oct(mode)}"


def test_a_record_from_before_the_schema_version_still_counts(eurosat_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--root", str(eurosat_root), *SWEEP, "--output", str(out))
    assert _cli(capsys, *args)[0] == 0
    (path,) = (out / "records").rglob("*.json")
    old = json.loads(path.read_text())
    del old["schema_version"]  # as the harness wrote records before the schema had a version
    path.write_text(json.dumps(old))
    code, text = _cli(capsys, *args)
    assert code == 0 and "0 done, 1 already finished" in text and "damaged" not in text
    assert json.loads(path.read_text()) == old  # neither moved nor rewritten


@pytest.mark.parametrize("change,reason", [
    ({"status": "done"}, "status"),
    ({"shots": "16"}, "shots"),
    ({"seed": None}, "seed"),
    ({"method": ""}, "method"),
    ({"metrics": []}, "metrics"),
    ({"metrics": {"base": {"n_images": 3}}}, "no accuracy"),
    ({"metrics": {"base": {"accuracy": "92.5"}}}, "accuracy"),
    ({"metrics": {"base": {"accuracy": 192.5}}}, "outside 0..100"),
    ({"metrics": {"base": {"accuracy": 50.0, "n_images": 2.5}}}, "n_images"),
    ({"metrics": {"base": {"status": "not_applicable"}}}, "reason"),
    ({"evals": "base"}, "evals"),
    ({"train": []}, "train"),
    ({"train": {"steps": "ten"}}, "train.steps"),
    ({"timings": {"train_s": "fast"}}, "train_s"),
    ({"schema_version": 99}, "newer harness"),
])
def test_the_record_schema_names_what_does_not_fit(change, reason):
    from benchmark import records

    good = {"schema_version": records.SCHEMA_VERSION, "id": "abc", "status": "ok", "method": "zsclip",
            "protocol": "base2novel", "dataset": "eurosat", "shots": 16, "seed": 1, "config": {},
            "evals": [{"name": "base", "dataset": "eurosat", "subsample": "base"}],
            "metrics": {"base": {"accuracy": 50.0, "n_images": 2}}, "train": {"steps": 3},
            "timings": {"train_s": 1.0}}
    assert records.validate(good) is good
    with pytest.raises(records.RecordError, match=reason):
        records.validate({**good, **change})
