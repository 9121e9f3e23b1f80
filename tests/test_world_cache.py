"""The built-in worlds are written once per machine (``datasets.worlds.prepare_world``):
shared by every results folder, written once by sweeps that start together, never read
half-written, moved by an environment variable, and written under the results folder
where the machine's cache cannot be written."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from datasets import synthetic
from datasets.worlds import WORLDS_ENV, prepare_world, world_folder_name, worlds_dir


def _prepare(cache: str, output: str, queue) -> None:
    said = []
    root = prepare_world("synthetic", output, said.append, cache=cache)
    queue.put((str(root), said))


def test_a_world_is_written_once_and_shared_by_every_results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(WORLDS_ENV, str(tmp_path / "worlds"))
    said = []
    first = prepare_world("synthetic", tmp_path / "a", said.append)
    assert first == tmp_path / "worlds" / world_folder_name("synthetic") and first.name.startswith("synthetic-v")
    assert (first / synthetic.MARKER).is_file() and len(said) == 1 and str(first) in said[0]
    stamp = (first / synthetic.MARKER).stat().st_mtime_ns
    assert prepare_world("synthetic", tmp_path / "b", said.append) == first  # another results folder
    assert len(said) == 1 and (first / synthetic.MARKER).stat().st_mtime_ns == stamp
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing under the outputs
    assert worlds_dir() == tmp_path / "worlds" and worlds_dir(tmp_path / "x") == tmp_path / "x"


def test_the_default_cache_follows_xdg_and_home(tmp_path, monkeypatch):
    monkeypatch.delenv(WORLDS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert worlds_dir() == tmp_path / "xdg" / "clip-fewshot-benchmark" / "worlds"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert worlds_dir() == tmp_path / "home" / ".cache" / "clip-fewshot-benchmark" / "worlds"


def test_two_sweeps_starting_together_write_the_world_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_prepare, args=(str(tmp_path / "worlds"), str(tmp_path / f"o{i}"), queue))
               for i in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    roots = {root for root, _ in results}
    assert len(roots) == 1 and sum(len(said) for _, said in results) == 1  # one of them wrote it
    assert sorted(p.name for p in (tmp_path / "worlds").iterdir()) == [".synthetic.lock",
                                                                        world_folder_name("synthetic")]


def test_a_write_killed_half_way_is_never_read(tmp_path, monkeypatch):
    folder = tmp_path / "worlds"
    name = world_folder_name("synthetic")
    half = folder / f".{name}.12345.tmp"  # a killed write's temporary folder
    (half / "eurosat").mkdir(parents=True)
    (folder / name / "dtd").mkdir(parents=True)  # a folder without its marker: not a world
    said = []
    root = prepare_world("synthetic", tmp_path / "out", said.append, cache=folder)
    assert len(said) == 1 and (root / synthetic.MARKER).is_file() and (root / "eurosat").is_dir()
    assert not half.exists()

    def killed(path, *args, **kw):
        (path / "eurosat").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "VERSION", 99, raising=False)  # a new version: a new folder
    monkeypatch.setattr(synthetic, "write_synthetic_root", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_world("synthetic", tmp_path / "out", said.append, cache=folder)
    assert not (folder / world_folder_name("synthetic")).exists()
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []  # cleaned on the way out
    assert world_folder_name("synthetic") != name and world_folder_name("synthetic").startswith("synthetic-v99-")


def test_an_unwritable_cache_puts_the_world_under_the_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    said = []
    root = prepare_world("synthetic", tmp_path / "out", said.append, cache=blocker / "worlds")
    assert root == tmp_path / "out" / "synthetic_data" and (root / synthetic.MARKER).is_file()
    assert "cannot be written" in said[0] and WORLDS_ENV in said[0]
    assert prepare_world("synthetic", tmp_path / "out", said.append, cache=blocker / "worlds") == root
    assert len(said) == 3  # the cache's problem is said each time; the world is written once


def test_the_command_line_uses_the_machines_world(tmp_path, monkeypatch, capsys):
    from benchmark.cli import main

    monkeypatch.setenv(WORLDS_ENV, str(tmp_path / "worlds"))
    args = ["--world", "synthetic", "--methods", "zsclip", "--datasets", "eurosat", "--seeds", "1", "--dry-run"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    assert "Writing synthetic datasets" in capsys.readouterr().out
    assert main(args + ["--output", str(tmp_path / "b")]) == 0
    assert "Writing" not in capsys.readouterr().out
    assert os.listdir(tmp_path / "worlds") and not (tmp_path / "b" / "synthetic_data").exists()
