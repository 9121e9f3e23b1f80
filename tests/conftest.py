"""Shared fixtures: a tiny CLIP built from an open_clip config and synthetic datasets
written on disk in the real CoOp/Dassl layout (the real loaders read them)."""

from __future__ import annotations

import copy
import os

import pytest

from benchmark.backbone import load_clip

B2N_TEST_DATASETS = ["oxford_pets", "eurosat"]


def _test_workers() -> int:
    """How many processes run the tests (``-n`` of the parallel runner; 1 without it)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)


def pytest_configure(config):
    """Parallel test processes share the CPU cores: each gets its share of the threads,
    and so do the processes the tests start (``OMP_NUM_THREADS``).  An ``OMP_NUM_THREADS``
    set beforehand (one thread: ``.ci/kernels``) is kept where it asks for fewer."""
    workers = _test_workers()
    if workers > 1:
        import torch

        from benchmark.executors.local import usable_cores

        threads = max(1, usable_cores() // workers)
        asked = os.environ.get("OMP_NUM_THREADS", "").strip()
        if asked.isdigit() and int(asked) > 0:
            threads = min(threads, int(asked))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def pytest_collection_modifyitems(config, items):
    """The modules with slow end-to-end tests first, and those tests first in their module
    (each module's tests stay together, so its fixtures are built once per process):
    parallel test processes then end together instead of one running the longest tests
    while the other idles."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    first_seen = {}
    for item in items:
        first_seen.setdefault(item.module.__name__, len(first_seen))
    items.sort(key=lambda item: (item.module.__name__ not in slow, first_seen[item.module.__name__],
                                 item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session", autouse=True)
def _world_cache(tmp_path_factory):
    """The built-in worlds of the whole session are written once, in a folder of the
    session (never in the user's cache); parallel test processes share that folder (the
    worlds are written under a lock and renamed into place)."""
    from datasets.worlds import WORLDS_ENV

    saved = os.environ.get(WORLDS_ENV)
    if _test_workers() > 1:  # every process's base folder lies in the session's
        shared = tmp_path_factory.getbasetemp().parent / "worlds"
        shared.mkdir(exist_ok=True)
        os.environ[WORLDS_ENV] = str(shared)
    else:
        os.environ[WORLDS_ENV] = str(tmp_path_factory.mktemp("worlds"))
    yield
    if saved is None:
        os.environ.pop(WORLDS_ENV, None)
    else:
        os.environ[WORLDS_ENV] = saved


@pytest.fixture(scope="session")
def _tiny_clip_master():
    return load_clip("tiny-clip-12", "cpu")


@pytest.fixture
def tiny_clip(_tiny_clip_master):
    """A private copy of the 12-layer tiny CLIP (random weights, fixed seed)."""
    return copy.deepcopy(_tiny_clip_master)


@pytest.fixture
def wide_console():
    """Tables in one line per row, as on a wide terminal (the command line's console)."""
    from benchmark.display import console

    width = console.width
    console.width = 400
    yield
    console.width = width


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from datasets.synthetic import write_synthetic_root

    root = tmp_path_factory.mktemp("data")
    write_synthetic_root(root, B2N_TEST_DATASETS)
    return root
