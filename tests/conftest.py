"""Shared fixtures: a tiny CLIP built from an open_clip config and synthetic datasets
written on disk in the real CoOp/Dassl layout (the real loaders read them)."""

from __future__ import annotations

import copy
import os

import pytest

from benchmark.backbone import load_clip

B2N_TEST_DATASETS = ["oxford_pets", "eurosat"]


@pytest.fixture(scope="session", autouse=True)
def _world_cache(tmp_path_factory):
    """The built-in worlds of the whole session are written once, in a folder of the
    session (never in the user's cache)."""
    from datasets.worlds import WORLDS_ENV

    saved = os.environ.get(WORLDS_ENV)
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
