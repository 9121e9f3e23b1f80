"""Process-level faults on real files and real processes: an unreadable image reads the
same with and without DataLoader worker processes; SIGTERM to a sweep's whole process group
ends it with the harness's own message and leaves no process behind; ``kill -9`` of a
sweep with worker processes takes its workers (and theirs) down within seconds.

The sweeps are real ``python run.py`` processes on synthetic data with the tiny CLIP; the
process checks read /proc, so they run on Linux only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmark import store
from datasets import build_dataset
from datasets.synthetic import write_synthetic_root

REPO = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# -- helpers ----------------------------------------------------------------------------------
def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])  # a JPEG cut off mid-file


def _sweep(root: Path, out: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # many processes on few cores
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), "--root", str(root), "--output", str(out),
                             *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _session(sid: int) -> dict[int, str]:
    """Live (not zombie) processes of session ``sid``: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
    return found


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.communicate()[0][-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _locks(out: Path) -> list[Path]:
    return list((out / "records").rglob("*.lock")) if (out / "records").exists() else []


def _kill_session(sid: int) -> None:
    """Whatever a failed test left running."""
    for pid in _session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# -- 1. an unreadable image: one line naming the file, whatever the worker count ------------------
@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory):
    """EuroSAT with a truncated test image, DTD with a truncated training image."""
    root = write_synthetic_root(tmp_path_factory.mktemp("damaged"), ["eurosat", "dtd"], n_train=2, n_val=1,
                                n_test=2)
    test_victim = build_dataset("eurosat", root, num_shots=0, subsample="base").test[0].impath
    train_victim = build_dataset("dtd", root, num_shots=0, subsample="base").train[0].impath
    for victim in (test_victim, train_victim):
        _truncate(victim)
    return root, {"eurosat": test_victim, "dtd": train_victim}


def test_an_unreadable_image_from_a_loader_worker_is_one_line_naming_the_file(damaged_root):
    """In this process, through the loaders themselves; the loader's workers are stopped
    at once (not seconds later, when the garbage collector frees the error's traceback)."""
    import multiprocessing

    import torch

    from benchmark.config import get_cfg_default
    from benchmark.images import ImageReadError
    from benchmark.loaders import test_loader, train_loader

    root, victims = damaged_root
    cfg = get_cfg_default()
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.DATALOADER.TEST.BATCH_SIZE = cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
    before = set(multiprocessing.active_children())
    for name, build in (("eurosat", test_loader), ("dtd", train_loader)):
        dataset = build_dataset(name, root, num_shots=0, subsample="base")
        data = [d for d in dataset.test + dataset.train if d.impath == victims[name]] + dataset.test[1:4]
        with pytest.raises(ImageReadError) as caught:
            list(build(data, cfg, torch.device("cpu")))
        message = str(caught.value)
        assert message.startswith(f"Cannot read image {victims[name]} (class '") and "\n" not in message
        assert "DataLoader worker" not in message and "Traceback" not in message
        assert caught.value.details["kind"] == "unreadable_image" and caught.value.details["path"] == victims[name]
        end = time.monotonic() + 2  # the error (and its traceback) is still held here
        while set(multiprocessing.active_children()) - before and time.monotonic() < end:
            time.sleep(0.05)
        assert not set(multiprocessing.active_children()) - before


@pytest.mark.parametrize("workers,fast", [("2", "True"), ("2", "False"), ("0", "True"), ("0", "False")])
def test_an_unreadable_image_fails_its_run_in_one_line_with_and_without_loader_workers(damaged_root, tmp_path,
                                                                                      capfd, workers, fast):
    """A sweep through the command line's own entry point: coop reads the images through
    the loaders (with the fast paths, its test images through the feature cache's path);
    mma's test images go through the decoded-image cache when the fast paths are on."""
    from benchmark.cli import main

    root, victims = damaged_root
    out = tmp_path / "out"
    code = main(["--root", str(root), "--output", str(out), "--methods", "coop,mma", "--datasets", "eurosat,dtd",
                 "--seeds", "1", "--opts", "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", workers,
                 "SPEED.ENABLED", fast, "SPEED.CACHE_DIR", str(tmp_path / "cache")])
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert code == 1, text
    assert "Original Traceback" not in text and "DataLoader worker" not in text, text
    assert "4 failed" in " ".join(text.split()), text
    for victim in victims.values():  # the summary's line names the file
        assert any(victim in line and "Cannot read image" in line for line in text.splitlines()), text
    records = list(store.iter_records(out))
    assert len(records) == 4 and all(r["status"] == "failed" for r in records), text
    for record in records:
        victim = victims[record["dataset"]]
        assert f": Cannot read image {victim} (class '" in record["error"], record["error"]
        assert "\n" not in record["error"] and "Original Traceback" not in record["traceback"], record["error"]
        assert record["details"] == {"kind": "unreadable_image", "path": victim,
                                     "class": record["details"]["class"]}, record.get("details")
        assert json.loads(Path(record["_path"]).read_text())["details"]["path"] == victim


@linux_only
def test_loader_workers_are_forked_also_in_a_sweep_worker_process(damaged_root):
    """A sweep's worker process comes from a fork server, so its default start method is the
    fork server's: each loader worker would import torch again, seconds per loader and
    epoch (5 epochs: 35 s instead of 2 s).  The loaders fork theirs, as torch does by default."""
    import torch

    from benchmark.config import get_cfg_default
    from benchmark.loaders import test_loader, train_loader

    root, _ = damaged_root
    cfg = get_cfg_default()
    data = build_dataset("eurosat", root, num_shots=0, subsample="base").test[1:3]
    for workers in (2, 0):
        cfg.DATALOADER.NUM_WORKERS = workers
        for build in (train_loader, test_loader):
            context = build(data, cfg, torch.device("cpu")).multiprocessing_context
            assert (context.get_start_method() if workers else context) == ("fork" if workers else None)


# -- 2. SIGTERM to the sweep's process group -------------------------------------------------------
def _loader_workers(sid: int) -> list[int]:
    """DataLoader worker processes of session ``sid`` (torch names them)."""
    found = []
    for pid in _session(sid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "pt_data_worker":
                found.append(pid)
        except OSError:
            pass
    return found


@linux_only
@pytest.mark.parametrize("executor", ["in-process", "worker-processes"])
def test_sigterm_to_the_process_group_ends_with_the_harness_message_only(synthetic_root, tmp_path, executor):
    """Every process of the sweep gets the signal, the loaders' workers included; with a
    worker process as well (its loaders start their workers through a fork server)."""
    out = tmp_path / "out"
    extra = [] if executor == "in-process" else ["--workers", "2"]  # one run: one worker process
    proc = _sweep(synthetic_root, out, "--methods", "coop", "--datasets", "eurosat", "--seeds", "1", *extra,
                  "--opts", "OPTIM.MAX_EPOCH", "2000", "DATALOADER.NUM_WORKERS", "2", start_new_session=True)
    try:
        _wait_for(lambda: _locks(out), 120, "the run to start", proc)
        _wait_for(lambda: len(_loader_workers(proc.pid)) >= 2, 120, "training (loader workers)", proc)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130, text[-3000:]
        assert "Interrupted: finished runs are saved" in text, text[-3000:]
        assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
        end = time.monotonic() + 10
        while _session(proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _session(proc.pid), _session(proc.pid)
        assert not _locks(out)  # the interrupted run's lock is released
    finally:
        _kill_session(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- 3. kill -9 of a sweep with worker processes ---------------------------------------------------
@linux_only
def test_kill_9_of_a_sweep_with_workers_ends_every_process_of_it_within_seconds(synthetic_root, tmp_path):
    out = tmp_path / "out"
    proc = _sweep(synthetic_root, out, "--methods", "coop", "--datasets", "eurosat", "--seeds", "1,2",
                  "--workers", "2", "--opts", "OPTIM.MAX_EPOCH", "3000", "DATALOADER.NUM_WORKERS", "1",
                  start_new_session=True)
    try:
        _wait_for(lambda: len(_locks(out)) == 2, 180, "both workers to start a run", proc)
        assert len(_session(proc.pid)) >= 4  # the sweep, its fork server and two workers at least
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        start = time.monotonic()
        while _session(proc.pid) and time.monotonic() - start < 10:
            time.sleep(0.1)
        left = _session(proc.pid)
        assert not left, f"still running {time.monotonic() - start:.0f} s after kill -9 of the sweep: {left}"
    finally:
        _kill_session(proc.pid)
        proc.stdout.close()


class _SignalOnStart(torch.utils.data.Sampler):
    """A sampler that sends this process SIGTERM while the loader's iterator is being built
    (the iterator asks for the sampler's iterator before it starts its workers)."""

    def __init__(self, n: int):
        self.n = n
        self.finished = False  # its __iter__ ran to its end (not cut by the signal's handler)

    def __len__(self):
        return self.n

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler would run here, inside the iterator's construction
        self.finished = True
        return iter(range(self.n))


@linux_only
def test_a_signal_while_loader_workers_start_interrupts_after_the_iterator_is_whole(capfd):
    """The race seen in CI: a signal taken while a loader starts its workers.  It must end the
    sweep as an interrupt once the iterator is whole, not leave a half-built iterator whose
    clean-up prints a traceback."""
    import gc

    from benchmark.workers import QuietLoader

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    saved = signal.signal(signal.SIGTERM, interrupt)
    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)  # a thread that does not block the signal,
    other.start()  # as the live progress display's: the kernel hands the signal to it
    try:
        sampler = _SignalOnStart(8)
        loader = QuietLoader(list(range(8)), batch_size=2, sampler=sampler, num_workers=2)
        caught = ""
        try:
            iter(loader)
        except KeyboardInterrupt as exc:  # not kept: the traceback would keep the iterator alive
            caught = str(exc)
        done.set()
        assert caught == "signal 15" and sampler.finished  # interrupted once the iterator was whole
        assert signal.getsignal(signal.SIGTERM) is interrupt  # the sweep's handler is back
        gc.collect()  # a half-built iterator would now print its failed clean-up
        assert list(QuietLoader(list(range(4)), batch_size=2, num_workers=2)) != []  # loaders still work
    finally:
        done.set()
        signal.signal(signal.SIGTERM, saved)
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err
