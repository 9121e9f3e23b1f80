"""The SLURM executor: each run is one SLURM job, submitted through submitit as a job array.

Jobs run ``benchmark.sweep.run_one`` with the same Python interpreter on the compute
nodes, which must see the results folder (a shared file system) and the project.
Submission files, pickled calls and each job's stdout/stderr go to ``<output>/slurm/``
(``<job id>_<task>_log.out`` / ``.err``).  Options: partition, time limit, GPUs, CPUs
and memory per job, how many array jobs run at once, and a YAML file of any other
submitit parameter (``slurm_account``, ``slurm_qos``, ``slurm_constraint``,
``slurm_setup``, ``slurm_additional_parameters``, ...); command-line options win.

A job that ends without a result (cancelled, preempted, timed out, node failure, killed)
is submitted again, up to ``max_retries`` times; then the run is reported lost with the
path of its log.  ``cluster="local"`` runs each job as a local process through the same
code path (``--slurm-cluster local``: the tests, and a dry run of a SLURM setup on a
laptop); ``debug`` runs jobs in this process, one after another.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from benchmark.executors.base import TICK_S, Executor, import_optional, lost

log = logging.getLogger(__name__)
CLUSTERS = ("slurm", "local", "debug")
DEFAULT_TIME = "4:00:00"
INSTALL_HINT = ("--executor slurm needs submitit, which is not installed in this Python environment. Install "
                "it with `pip install -e \".[slurm]\"` from the repository (or `pip install \"submitit>=1.5\"`) "
                "and run the same command again, or use --executor local or --executor ray.")
GENERIC = ("timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "name",
           "stderr_to_stdout")


def import_submitit():
    return import_optional("submitit", INSTALL_HINT)


def parse_minutes(text: str | int) -> int:
    """A time limit in SLURM's formats, in whole minutes (seconds round up): minutes (90),
    minutes:seconds, hours:minutes:seconds (1:30:00), days-hours, days-hours:minutes,
    days-hours:minutes:seconds (2-00:00:00)."""
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text)
    parts = [int(p) for p in match.group(2).split(":")] if match else []
    if not match or (match.group(1) is None and len(parts) > 3):
        raise ValueError(f"--slurm-time takes a SLURM time limit: minutes (90), hours:minutes:seconds "
                         f"(1:30:00) or days-hours[:minutes[:seconds]] (2-00:00:00); got '{text}'.")
    if match.group(1) is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(match.group(1)) * 1440 + hours * 60 + minutes + (seconds > 0)
    elif len(parts) == 3:
        total = parts[0] * 60 + parts[1] + (parts[2] > 0)
    elif len(parts) == 2:
        total = parts[0] + (parts[1] > 0)
    else:
        total = parts[0]
    if total < 1:
        raise ValueError(f"--slurm-time must be at least one minute; got '{text}'.")
    return total


def parse_gigabytes(text: str | float) -> float:
    """'32G', '32GB', '32000M', '32' (GB) -> gigabytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mMgGtT]?)[bB]?\s*", str(text))
    if not match:
        raise ValueError(f"--slurm-mem takes a size such as 32G, 500M or 32 (GB); got '{text}'.")
    value, unit = float(match.group(1)), match.group(2).upper()
    return value * {"M": 1 / 1024, "G": 1, "T": 1024, "": 1}[unit]


def read_config(path: str | Path) -> dict:
    """The parameters of a ``--slurm-config`` YAML: submitit names, with or without ``slurm_``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"--slurm-config: no file {path}.") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--slurm-config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--slurm-config: {path} must hold a mapping of parameter: value (e.g. "
                         f"slurm_account: my_lab); it holds a {type(data).__name__}.")
    return {key if key in GENERIC or key.startswith(("slurm_", "local_", "debug_")) else f"slurm_{key}": value
            for key, value in data.items()}


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, *, output: str | Path, cluster: str = "slurm", partition: str | None = None,
                 time: str | int | None = None, gpus: int | None = None, cpus: int | None = None,
                 mem: str | None = None, array_parallelism: int | None = None, config: str | Path | None = None,
                 max_retries: int = 2, **_: object):
        params = self.check(cluster=cluster, partition=partition, time=time, gpus=gpus, cpus=cpus, mem=mem,
                            array_parallelism=array_parallelism, config=config, max_retries=max_retries)
        submitit = import_submitit()
        self.folder = Path(output) / "slurm"
        self.cluster = cluster
        self.max_retries = max_retries
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        try:
            self.executor.update_parameters(**params)
        except (NameError, AssertionError, TypeError, ValueError) as exc:
            raise ValueError(f"SLURM parameters refused by submitit: {exc}. Check --slurm-config and the "
                             f"--slurm-* options.") from None
        # SLURM throttles arrays itself; local jobs only when asked (all at once otherwise)
        limit = params.get("slurm_array_parallelism")
        self.window = None if cluster == "slurm" else limit
        self.parallelism = int(limit or (256 if cluster == "slurm" else os.cpu_count() or 1))

    @staticmethod
    def check(*, cluster: str = "slurm", partition: str | None = None, time: str | int | None = None,
              gpus: int | None = None, cpus: int | None = None, mem: str | None = None,
              array_parallelism: int | None = None, config: str | Path | None = None, max_retries: int = 2,
              **_: object) -> dict:
        """Validate the options (before any work: submitit installed, SLURM reachable, values
        readable); returns the submitit parameters.  None means not given: the YAML's value,
        else the default (time 4:00:00, one GPU); a given option beats the YAML."""
        if cluster not in CLUSTERS:
            raise ValueError(f"--slurm-cluster must be one of {', '.join(CLUSTERS)}; got '{cluster}'.")
        if max_retries < 0:
            raise ValueError(f"--max-retries must be 0 or more; got {max_retries}.")
        submitit = import_submitit()
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise RuntimeError("--executor slurm: no SLURM here (the sbatch command is not on PATH). Run the sweep "
                               "from a machine that submits SLURM jobs (a login node), or pass --slurm-cluster "
                               "local to run each job as a local process.")
        params: dict[str, Any] = read_config(config) if config else {}
        known = getattr(submitit.SlurmExecutor, "_valid_parameters", lambda: None)()
        if known is not None:
            unknown = sorted(k for k in params if k.startswith("slurm_") and k[len("slurm_"):] not in known)
            if unknown:
                raise ValueError(f"--slurm-config {config}: unknown parameter(s) {', '.join(unknown)}. Known: "
                                 f"{', '.join(GENERIC)}, and slurm_ followed by one of {', '.join(sorted(known))}.")
        params.setdefault("name", "clip-fewshot")
        if (gpus is not None and gpus < 0) or (cpus is not None and cpus < 1):
            raise ValueError(f"--slurm-gpus must be 0 or more and --slurm-cpus at least 1; got {gpus} and {cpus}.")
        if array_parallelism is not None and array_parallelism < 1:
            raise ValueError(f"--slurm-array-parallelism must be at least 1; got {array_parallelism}.")

        def setting(generic: str, specific: str, value, default=None) -> None:
            if value is not None:  # given on the command line
                params.pop(specific, None)
                params[generic] = value
            elif generic not in params and specific not in params and default is not None:
                params[generic] = default

        setting("timeout_min", "slurm_time", None if time is None else parse_minutes(time),
                parse_minutes(DEFAULT_TIME))
        setting("gpus_per_node", "slurm_gpus_per_node", gpus, 1)
        setting("cpus_per_task", "slurm_cpus_per_task", cpus)
        setting("mem_gb", "slurm_mem", None if mem is None else parse_gigabytes(mem))
        setting("slurm_partition", "slurm_partition", partition)
        setting("slurm_array_parallelism", "slurm_array_parallelism", array_parallelism)
        params.update(nodes=1, tasks_per_node=1)  # one process per run
        return params

    def _submit(self, fn: Callable, items: list) -> list:
        try:
            if len(items) == 1:
                return [self.executor.submit(fn, items[0])]
            return list(self.executor.map_array(fn, items))
        except Exception as exc:  # sbatch refused: a bad partition, account or limit
            raise RuntimeError(f"SLURM refused the jobs: {exc}") from None

    def map(self, fn: Callable[[Any], dict], items: Iterable[Any], *,
            tick: Callable[[], None] | None = None) -> Iterator[tuple[Any, dict]]:
        waiting = list(items)
        pending: dict[Any, tuple[Any, int]] = {}  # job -> (item, attempt)
        attempts = 1 + self.max_retries
        try:
            while waiting or pending:
                room = len(waiting) if self.window is None else max(0, self.window - len(pending))
                if room and waiting:
                    batch, waiting = waiting[:room], waiting[room:]
                    for job, item in zip(self._submit(fn, batch), batch):
                        pending[job] = (item, 1)
                finished = [job for job in pending if job.done()]
                for job in finished:
                    item, attempt = pending.pop(job)
                    try:
                        outcome = job.result()
                    except Exception as exc:  # the job died without a result
                        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                        message = (f"SLURM job {job.job_id} ended without a result ({first}) on attempt {attempt} "
                                   f"of {attempts}; log: {job.paths.stderr}")
                        if attempt < attempts:
                            log.warning("%s; submitting it again", message)
                            pending[self._submit(fn, [item])[0]] = (item, attempt + 1)
                            continue
                        outcome = lost(message)
                    yield item, outcome
                if tick:
                    tick()
                if not finished and pending:
                    time.sleep(TICK_S)
        finally:
            for job in pending:
                try:
                    job.cancel(check=False)
                except Exception:  # already ended
                    pass
