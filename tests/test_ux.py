"""The commands a researcher uses every day, end to end on real files: list, check,
new-method (its template passes its own tests), plots and logs next to the tables, and
help texts with examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from benchmark.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("wide_console")


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).replace("│", " ").split())


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from datasets.synthetic import write_synthetic_root

    return write_synthetic_root(tmp_path_factory.mktemp("data"), ["eurosat", "dtd"])


def test_list_shows_papers_configs_and_which_datasets_are_present(small_root, capsys):
    code, text = _cli(capsys, "list", "--root", str(small_root))
    assert code == 0
    assert "mma" in text and "MMA: Multi-Modal Adapter" in text and "mma.yaml (+ imagenet" in text
    assert "eurosat eurosat 10 yes" in text and "caltech101 caltech-101 100 no" in text
    assert "cross_dataset" in text and "vit-b-16-random" in text


def test_check_reports_each_dataset_and_the_fix(small_root, tmp_path, capsys):
    code, text = _cli(capsys, "check", "--root", str(small_root), "--datasets", "eurosat,dtd")
    assert code == 0 and "2 of 2 datasets ready" in text
    assert "eurosat ready 10 80 20 40" in text

    import shutil

    broken = tmp_path / "root"
    shutil.copytree(small_root, broken)
    victim = next((broken / "dtd" / "images").rglob("*.jpg"))
    victim.unlink()
    code, text = _cli(capsys, "check", "--root", str(broken), "--datasets", "eurosat,dtd,oxford_pets")
    assert code == 1 and "1 of 3 datasets ready" in text
    assert "dtd incomplete" in text and str(victim) in text and "Re-extract" in text
    assert "oxford_pets missing" in text and "split_zhou_OxfordPets.json" in text


def test_new_method_template_passes_its_own_tests_and_runs_in_a_sweep(tmp_path, capsys):
    code, text = _cli(capsys, "new-method", "my_adapter", "--into", str(tmp_path / "plugin"))
    assert code == 0 and "wrote" in text
    files = sorted(p.relative_to(tmp_path / "plugin").as_posix() for p in (tmp_path / "plugin").rglob("*")
                   if p.is_file())
    assert files == ["configs/my_adapter.yaml", "my_adapter.py", "test_my_adapter.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "plugin"), str(REPO)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_adapter.py"],
                          cwd=tmp_path / "plugin", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout + done.stderr
    # the same name again, an existing method and a bad name are refused with the reason
    assert _cli(capsys, "new-method", "my_adapter", "--into", str(tmp_path / "plugin"))[1].count("--force") == 1
    assert "already registered" in _cli(capsys, "new-method", "mma", "--into", str(tmp_path / "x"))[1]
    code, text = _cli(capsys, "new-method", "My-Method", "--into", str(tmp_path / "x"))
    assert code == 2 and "lower-case letters" in text


def test_a_sweep_leaves_tables_plots_and_one_log_per_run(small_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, text = _cli(capsys, "--methods", "zsclip,coop", "--datasets", "eurosat", "--seeds", "1", "--root",
                      str(small_root), "--clip", "tiny-clip-12", "--output", str(out), "-q",
                      "--opts", "OPTIM.MAX_EPOCH", "2", "DATALOADER.NUM_WORKERS", "0")
    assert code == 0 and "2 done" in text and "Base-to-novel" in text
    bars = out / "plots" / "base2novel-synthetic-bars.png"
    with Image.open(bars) as image:
        assert image.size[0] >= 600 and image.size[1] == 900  # three panels, 7.5 in at 120 dpi
    assert not (out / "plots" / "base2novel-synthetic-delta.png").exists()  # fakes have no published numbers
    logs = sorted((out / "logs").rglob("*.log"))
    assert len(logs) == 2
    coop_log = next(p for p in logs if "coop" in p.parts).read_text()
    assert "epoch 2/2" in coop_log and "base: accuracy" in coop_log


def test_delta_plot_against_published_numbers(tmp_path):
    from benchmark.tables import base2novel_plots, delta_plot

    table = pd.DataFrame({
        "method": ["mma", "mma", "coop", "coop"], "dataset": ["eurosat", "dtd", "eurosat", "dtd"],
        "base": [90.0, 80.0, 88.0, 79.0], "base_std": 0.0, "novel": [70.0, 60.0, 55.0, 50.0], "novel_std": 0.0,
        "hm": [78.75, 68.57, 67.69, 61.24], "seeds": 3, "paper_base": [85.0, 83.0, 92.0, 79.4],
        "paper_novel": [82.0, 65.0, 54.7, 41.2], "paper_hm": [83.5, 72.9, 68.6, 54.2]})
    table["delta_hm"] = table["hm"] - table["paper_hm"]
    (delta,) = delta_plot(table, tmp_path, "base2novel", "base2novel")
    (bars,) = base2novel_plots(table, tmp_path, "base2novel")
    for path in (delta, bars):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    accuracy = pd.DataFrame({"method": ["coop"] * 2, "dataset": ["imagenet_a", "imagenet_r"], "shots": 16,
                             "accuracy": [49.0, 75.0], "paper": [49.71, 75.21]})
    assert [p.name for p in delta_plot(accuracy, tmp_path, "dg", "domain_generalization")] == ["dg-delta.png"]
    assert delta_plot(accuracy.assign(paper=float("nan")), tmp_path, "none", "domain_generalization") == []


def test_every_option_explains_itself():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"run", "table", "list", "check", "bench", "new-method"} <= set(commands)
    for name, command in commands.items():
        for action in command._actions:
            if action.dest in ("help",):
                continue
            assert action.help and len(action.help) > 15, (name, action.dest)
    run_help = commands["run"].format_help()
    assert run_help.count("e.g.") >= 10


def test_live_progress_shows_the_sweep_the_epochs_and_the_evaluation(tmp_path, monkeypatch):
    """On a terminal: one line for the sweep, one for the run in progress (training steps
    with the epoch and loss, then evaluated images), each with its rate and time left."""
    import io
    import re

    from rich.console import Console

    from benchmark import display, trainer

    screen = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=screen, force_terminal=True, width=160))
    code = main(["--methods", "coop", "--world", "synthetic", "--datasets", "eurosat", "--seeds", "1",
                 "--output", str(tmp_path / "out"), "--opts", "OPTIM.MAX_EPOCH", "3"])
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.getvalue())
    assert code == 0
    assert re.search(r"local .*1/1\s+1 done, 0 running, 0 failed, 0 skipped", text)
    assert re.search(r"train .*epoch [1-3]/3 loss [0-9.]+, [0-9.]+ steps/s", text)
    assert re.search(r"eval .*\d+/\d+ 5 classes, [0-9.]+ img/s", text)
    assert not hasattr(trainer, "_progress")  # handed down to the run, no global hook to leave behind
