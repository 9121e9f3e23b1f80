"""Scale-out executors on real engines: worker processes, a local Ray instance on the CPU
and submitit's local cluster run a small sweep (tiny CLIP, synthetic data) and write the
same records as the in-process sweep; a worker killed mid-run (SIGKILL from a plugin
method) is retried and the sweep completes, and with its retries used up the failure is
recorded and reported; two sweeps on one results folder at once (two real processes)
run each run once; run locks; an executor whose package is missing says how to install it.

Ray starts once for the module (slow on 2 cores).  Every process of this module computes
with one CPU thread (Ray's workers do by default), so that the records can be compared
exactly: with other thread counts, float sums round differently in the last bits."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark import protocols, store
from benchmark.cli import main
from benchmark.sweep import SweepState, unique_specs

REPO = Path(__file__).resolve().parent.parent
PLUGIN_MODULE = "sweep_test_methods"
PLUGIN_METHODS = ("killonce", "killalways", "sleepy")
# Methods that misbehave on purpose.  Each appends a line per attempt to a file under the
# sweep's output (found through its SPEED.CACHE_DIR), so tests count attempts on disk.
PLUGIN = '''
import os
import signal
import time
from pathlib import Path

from methods.registry import register_method
from methods.zsclip import ZeroShotCLIP


def _attempt(ctx, name):
    folder = Path(ctx.cfg.SPEED.CACHE_DIR).parent / "attempts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-seed{ctx.cfg.SEED}"
    with open(path, "a") as handle:
        handle.write(f"{os.getpid()}\\n")
    return len(path.read_text().splitlines())


@register_method("killonce", node="KILLONCE", defaults=dict(PREC="fp32", TEMPLATE=""))
class KillOnce(ZeroShotCLIP):
    """Zero-shot CLIP whose process dies (SIGKILL) the first time it runs."""

    def fit(self, ctx):
        if _attempt(ctx, "killonce") == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}


@register_method("killalways", node="KILLALWAYS", defaults=dict(PREC="fp32", TEMPLATE=""))
class KillAlways(ZeroShotCLIP):
    def fit(self, ctx):
        _attempt(ctx, "killalways")
        os.kill(os.getpid(), signal.SIGKILL)


@register_method("sleepy", node="SLEEPY", defaults=dict(PREC="fp32", TEMPLATE=""))
class Sleepy(ZeroShotCLIP):
    """Zero-shot CLIP that takes two seconds, so that two sweeps overlap."""

    def fit(self, ctx):
        _attempt(ctx, "sleepy")
        time.sleep(2.0)
        return {}
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread here and in every worker this module starts (they read the variable)."""
    import torch

    saved_env, saved_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved_threads)
    if saved_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved_env


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    yield folder
    # leave the registry as other test modules expect it (registered methods enter every config)
    from methods import registry

    sys.path.remove(str(folder))
    for name in PLUGIN_METHODS:
        registry._REGISTRY.pop(name, None)
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _sweep(out: Path, root: Path, *extra: str, methods: str = "coop,zsclip") -> int:
    return main(["run", "--methods", methods, "--datasets", "eurosat", "--seeds", "1", "--root", str(root),
                 "--clip", "tiny-clip-12", "--output", str(out), "--plugin", PLUGIN_MODULE,
                 "--opts", "OPTIM.MAX_EPOCH", "1", *extra])


def _records(out: Path) -> dict:
    """method -> what must not depend on the executor: identity, metrics, losses."""
    found = {}
    for record in store.iter_records(out):
        found[record["method"]] = record
    return found


def _same(record: dict, reference: dict) -> None:
    """Exact: the claim is that the executor changes no bit; both sides are the same run with the
    same operations on this machine, one thread each (see the module's docstring)."""
    assert record["status"] == "ok"
    assert record["id"] == reference["id"]  # a hash of everything that can change a number
    def numbers(metrics):  # everything but the evaluation's wall time
        return {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in metrics.items()}

    assert numbers(record["metrics"]) == numbers(reference["metrics"])
    assert record["train"]["epoch_losses"] == reference["train"]["epoch_losses"]


def _attempts(out: Path, name: str) -> int:
    path = out / "attempts" / f"{name}-seed1"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def reference(plugin, synthetic_root, tmp_path_factory):
    """The in-process sweep (the default executor) of coop (trains) and zsclip."""
    out = tmp_path_factory.mktemp("in_process")
    assert _sweep(out, synthetic_root) == 0
    records = _records(out)
    assert set(records) == {"coop", "zsclip"} and records["coop"]["train"]["epoch_losses"]
    return records


def _check_killed_sweep(out: Path, reference: dict, text: str, *, always: bool = True) -> None:
    records = _records(out)
    for method in ("coop", "zsclip"):
        _same(records[method], reference[method])
    assert records["killonce"]["status"] == "ok" and _attempts(out, "killonce") == 2  # killed, retried, done
    if always:
        assert "killalways" in records, (text, sorted(p.name for p in out.rglob("*")))
        failed = records["killalways"]
        assert failed["status"] == "failed" and _attempts(out, "killalways") == 2  # 1 + --max-retries 1
        assert "killalways" in text and "3 done, 0 already finished, 1 failed" in " ".join(text.split())
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.tmp"))


def test_worker_processes_match_in_process_and_retry_a_killed_worker(reference, synthetic_root, tmp_path, capsys):
    out = tmp_path / "workers"
    code = _sweep(out, synthetic_root, "--workers", "2", "--max-retries", "1",
                  methods="coop,zsclip,killonce,killalways")
    text = capsys.readouterr().out
    assert code == 1, text  # one run failed
    _check_killed_sweep(out, reference, text)
    failed = _records(out)["killalways"]
    assert "died (killed by SIGKILL)" in failed["error"] and "attempt 2 of 2" in failed["error"]
    # finished runs are skipped whichever executor made them
    capsys.readouterr()
    assert _sweep(out, synthetic_root, methods="coop,zsclip,killonce") == 0
    assert "0 done, 3 already finished, 0 failed" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_ray_matches_in_process_and_retries_a_killed_worker(reference, ray_instance, synthetic_root, tmp_path,
                                                           capsys):
    out = tmp_path / "ray"
    code = _sweep(out, synthetic_root, "--executor", "ray", "--max-retries", "1",
                  methods="coop,zsclip,killonce,killalways")
    text = capsys.readouterr().out
    assert code == 1, text
    _check_killed_sweep(out, reference, text)
    assert "WorkerCrashedError" in _records(out)["killalways"]["error"]
    assert ray_instance.is_initialized()  # a Ray instance the sweep did not start is left running


@pytest.mark.slow
def test_submitit_local_cluster_matches_in_process_and_resubmits_a_killed_job(reference, synthetic_root, tmp_path,
                                                                             capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "slurm"
    config = tmp_path / "slurm.yaml"
    config.write_text("slurm_account: my_lab\nslurm_additional_parameters: {constraint: a100}\n")
    code = _sweep(out, synthetic_root, "--executor", "slurm", "--slurm-cluster", "local", "--slurm-gpus", "0",
                  "--slurm-time", "10", "--slurm-config", str(config), methods="coop,zsclip,killonce")
    text = capsys.readouterr().out
    assert code == 0, text
    _check_killed_sweep(out, reference, text, always=False)
    logs = list((out / "slurm").glob("*_log.out"))
    assert len(logs) == 4  # three jobs and the resubmitted one, one log each


@pytest.mark.slow
def test_two_sweeps_at_once_run_each_run_once(plugin, synthetic_root, tmp_path):
    out = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(REPO / "run.py"), "--methods", "sleepy", "--datasets", "eurosat",
            "--seeds", "1,2,3,4", "--root", str(synthetic_root), "--clip", "tiny-clip-12", "--output", str(out),
            "--plugin", PLUGIN_MODULE]
    procs = [subprocess.Popen(args + extra, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for extra in ([], ["--workers", "2"])]
    texts = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], texts
    for seed in (1, 2, 3, 4):  # each run's method ran exactly once
        assert len((out / "attempts" / f"sleepy-seed{seed}").read_text().splitlines()) == 1
    records = list(store.iter_records(out))
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    done = [int(" ".join(t.split()).split("Runs: ")[1].split(" done")[0]) for t in texts]
    assert sum(done) == 4, texts
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.tmp"))


def test_a_run_locked_by_a_live_sweep_is_left_to_it(plugin, synthetic_root, tmp_path, capsys):
    out = tmp_path / "locked"
    assert _sweep(out, synthetic_root, methods="zsclip") == 0
    record = Path(next(store.iter_records(out))["_path"])
    record.unlink()
    lock = record.with_suffix(".lock")
    with store.acquire_lock(lock, sweep="another sweep"):  # held by a live process: this one
        capsys.readouterr()
        assert _sweep(out, synthetic_root, methods="zsclip") == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "0 done, 0 already finished, 0 failed, 1 running in another sweep" in text
        assert f"process {os.getpid()} on {socket.gethostname()}" in text
        assert not record.exists()
    assert not lock.exists()


def test_run_locks_exclusive_stale_and_taken_over(tmp_path, caplog):
    path = tmp_path / "run.lock"
    lock = store.acquire_lock(path, sweep="a")
    with pytest.raises(store.LockHeld) as held:
        store.acquire_lock(path, sweep="b")
    assert held.value.holder["pid"] == os.getpid() and "running elsewhere" in str(held.value)
    lock.release()
    assert not path.exists()

    # a dead process of this host: taken over at once, with a warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time(),
                                "sweep": "old", "token": "t1"}))
    with caplog.at_level(logging.WARNING, logger="benchmark.store"):
        with store.acquire_lock(path, sweep="b") as taken:
            assert store.lock_holder(path)["token"] == taken.token
    assert "is gone" in caplog.text and not path.exists()

    # another machine: live while touched, stale once untouched for longer than the limit
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "started": time.time(), "sweep": "c", "token": "t2"}))
    with pytest.raises(store.LockHeld):
        store.acquire_lock(path, sweep="b", stale_after=60)
    old = time.time() - 120
    os.utime(path, (old, old))
    store.acquire_lock(path, sweep="b", stale_after=60).release()
    # the same sweep's earlier attempt on another machine (the executor gave it up)
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "started": time.time(), "sweep": "b", "token": "t3"}))
    store.acquire_lock(path, sweep="b").release()
    assert not path.exists()

    # the heartbeat keeps a long run's lock fresh
    lock = store.acquire_lock(path, heartbeat=0.05)
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


def test_one_run_per_identity_with_the_union_of_evaluations():
    common = dict(root="unused", backbone="tiny-clip-12", backbone_id="tiny")
    cross = protocols.transfer(["coop"], ["eurosat", "dtd"], [1], 16, **common)
    dg = protocols.transfer(["coop"], ["imagenetv2", "eurosat"], [1], 16, **common)
    b2n = protocols.base2novel(["coop"], ["eurosat"], [1], 16, **common)
    merged = unique_specs(cross + b2n + dg + b2n)
    assert len(merged) == 2 and merged[0].run_id == cross[0].run_id
    assert [e.name for e in merged[0].evals] == ["imagenet", "eurosat", "dtd", "imagenetv2"]


def test_time_left_from_finished_runs():
    state = SweepState(todo=10, parallel=2)
    assert state.eta() is None
    state.settled, state.durations = 4, [10.0, 20.0, 15.0, 15.0]
    assert state.eta() == pytest.approx(6 * 15.0 / 2)
    state.settled = 9
    assert state.eta() == pytest.approx(15.0)  # one run left: parallelism does not help


def test_missing_engine_packages_say_how_to_install_them(synthetic_root, tmp_path):
    """A Python whose Ray and submitit cannot be imported (as when they are not installed)."""
    common = ["--methods", "zsclip", "--datasets", "eurosat", "--seeds", "1", "--root", str(synthetic_root),
              "--clip", "tiny-clip-12", "--output", str(tmp_path / "out")]
    code = ("import sys; sys.modules['ray'] = None; sys.modules['submitit'] = None\n"
            "from benchmark.cli import main\n"
            f"a = main({['run', *common, '--executor', 'ray']!r})\n"
            f"b = main({['run', *common, '--executor', 'slurm', '--slurm-cluster', 'local']!r})\n"
            "sys.exit(10 * a + b)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 22, proc.stdout + proc.stderr
    assert 'needs Ray, which is not installed' in text and 'pip install -e ".[ray]"' in text
    assert 'needs submitit, which is not installed' in text and 'pip install -e ".[slurm]"' in text
    assert not (tmp_path / "out").exists()  # nothing was prepared or run


def test_slurm_options_time_memory_and_yaml(tmp_path):
    pytest.importorskip("submitit")
    from benchmark.executors.slurm import SlurmExecutor, parse_gigabytes, parse_minutes

    assert [parse_minutes(t) for t in ("90", "45:30", "1:30:00", "2-00:00:00", "1-2:30")] == [90, 46, 90, 2880, 1590]
    assert parse_gigabytes("32G") == 32 and parse_gigabytes("512M") == 0.5
    config = tmp_path / "slurm.yaml"
    config.write_text("timeout_min: 600\nqos: high\nslurm_setup: [module load cuda]\n")
    from_yaml = SlurmExecutor.check(cluster="local", config=config)
    assert from_yaml["timeout_min"] == 600 and from_yaml["slurm_qos"] == "high" and from_yaml["gpus_per_node"] == 1
    given = SlurmExecutor.check(cluster="local", config=config, time="30", gpus=0, partition="gpu", mem="8G")
    assert (given["timeout_min"], given["gpus_per_node"], given["slurm_partition"], given["mem_gb"]) == (30, 0, "gpu", 8)
    config.write_text("slurm_acount: my_lab\n")  # misspelt
    with pytest.raises(ValueError, match="unknown parameter.*slurm_acount"):
        SlurmExecutor.check(cluster="local", config=config)
    with pytest.raises(ValueError, match="--slurm-time"):
        parse_minutes("1:2:3:4")


def test_options_of_another_executor_are_refused(capsys):
    assert main(["run", "--workers", "2", "--executor", "ray", "--dry-run"]) == 2
    assert "--workers is an option of --executor local" in capsys.readouterr().out
    assert main(["run", "--slurm-time", "10", "--dry-run"]) == 2
    assert "--slurm-time is an option of --executor slurm" in capsys.readouterr().out


def test_default_workers_one_single_thread_process_per_core_for_the_built_in_worlds_on_the_cpu():
    from benchmark.executors.local import default_workers, usable_cores

    cores = usable_cores()
    assert default_workers(tiny_model=True, on_cpu=True, runs=1000) == cores
    assert default_workers(tiny_model=True, on_cpu=True, runs=1) == 1  # one run: no process to start
    assert default_workers(tiny_model=True, on_cpu=True, runs=2) == min(cores, 2)
    assert default_workers(tiny_model=False, on_cpu=True, runs=1000) == 1  # real weights: all threads, one copy
    assert default_workers(tiny_model=True, on_cpu=False, runs=1000) == 1  # a GPU: per-GPU rules


def test_the_built_in_world_without_workers_uses_every_core_and_gives_the_records_of_one_process(tmp_path, capsys):
    """The default command's path: no --workers, no --clip, the synthetic world on the CPU."""
    args = ["--world", "synthetic", "--methods", "zsclip,linear_probe", "--datasets", "eurosat", "--seeds", "1",
            "--device", "cpu", "--opts", "OPTIM.MAX_EPOCH", "1"]
    assert main(["run", *args, "--output", str(tmp_path / "default")]) == 0
    text = capsys.readouterr().out
    from benchmark.executors.local import usable_cores

    cores = usable_cores()
    assert (f"{min(cores, 2)} worker processes, one per CPU core" in text) == (cores > 1), text
    assert main(["run", *args, "--workers", "1", "--output", str(tmp_path / "one")]) == 0
    default, one = _records(tmp_path / "default"), _records(tmp_path / "one")
    assert set(default) == set(one) == {"zsclip", "linear_probe"}
    for method, record in default.items():  # one thread everywhere in this module: the same numbers
        _same(record, one[method])


def test_a_killed_attempt_still_exiting_is_waited_for_and_another_sweeps_lock_is_not(synthetic_root, tmp_path):
    """An executor reports a killed attempt (and starts the next one, or records the loss)
    when its sockets close, which can be before its process is gone: the lock it left,
    held in this sweep's name by a live process, is waited for; another sweep's is not."""
    import socket

    from benchmark.sweep import RunOptions, run_one

    spec = protocols.base2novel(["zsclip"], ["eurosat"], [1], 16, root=str(synthetic_root), backbone="tiny-clip-12",
                                backbone_id="tiny")[0]
    out = tmp_path / "out"
    lock = store.lock_path(out, spec)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for sweep, expected in (("other", "elsewhere"), ("this", "ok")):
        exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": exiting.pid, "started": time.time(),
                                    "sweep": sweep, "token": sweep}))
        start = time.monotonic()
        outcome = run_one(spec.to_dict(), str(out), RunOptions(device="cpu", sweep_id="this"))
        waited = time.monotonic() - start
        exiting.wait()
        assert outcome["status"] == expected, outcome
        if expected == "elsewhere":  # another live sweep's run: left to it at once
            assert waited < 1.5 and lock.exists()
            lock.unlink()
        else:  # this sweep's earlier attempt: run once its process is gone
            assert exiting.returncode == 0 and not lock.exists()
            assert store.is_finished(out, spec)
