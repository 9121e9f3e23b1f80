"""Protocols turn (methods, datasets, seeds, shots) into run specs.

A run spec is plain data: what to train (method, dataset, class subset, shots, seed,
backbone, config) and what to evaluate afterwards (named evaluation splits).  Its
identity is a hash of everything that can change a number, so a finished run is never
repeated and an interrupted sweep resumes where it stopped.

base2novel (CoCoOp / MaPLe / MMA): for each dataset and seed, train on the base half of
the classes with K shots (the K-shot draw is over all classes, then the base half is
kept), evaluate on the base test classes ("base") and on the new test classes ("novel")
with the same trained model.  HM = 2BN / (B + N) of the seed-averaged B and N.

cross_dataset and domain_generalization share one training per method and seed: ImageNet,
all classes, 16 shots, the method's ``cross_dataset`` config variant (applied after the
``imagenet`` variant: the official cross-dataset configs are written for ImageNet).  That
run (protocol ``transfer``) evaluates on ImageNet's test set (the source) and on the full
test sets of the targets each protocol names: the other ten datasets (cross_dataset) and
the four ImageNet variants (domain_generalization).  Its identity does not include the
targets: asking for more targets later evaluates the saved weights on the missing ones and
never trains again.

few_shot (CoOp paper): per dataset, all classes, K in 1 2 4 8 16 shots, evaluated on the
full test set ("test"), with the ``few_shot`` variant, then ``few_shot_<K>`` (epochs
that depend on K), the dataset's, and ``few_shot_<dataset>`` (few-shot settings that
differ per dataset).

Variants of a method's YAML apply in this order: protocol (few_shot, few_shot_<K>),
dataset (then few_shot_<dataset>), world (``toy``; the shipped configs have none); for the
transfer run: dataset (imagenet), cross_dataset, world.

The toy world's schedule rule (``toy_epochs``), the one change the toy world makes to any
method's official hyper-parameters: a CPU cannot afford the official schedules (CoOp's 200
epochs, ImageNet's batches of 128), so every run keeps its official warm-up and then its
official schedule cut to the whole epochs that take at most ``TOY_MAX_STEPS`` optimiser
steps (at least one epoch).  Learning rate, batch size, warm-up and scheduler
stay official (the cosine then spans the shortened run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from yacs.config import CfgNode as CN

from benchmark import config as C
from methods.registry import MethodInfo, add_method_defaults, get_method

PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization", "few_shot")
TRANSFER = "transfer"  # the protocol name of the shared ImageNet training
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_SHOTS = 16
FEW_SHOT_SHOTS = (1, 2, 4, 8, 16)
# the toy world's schedule rule (toy_epochs): at most this many optimiser steps per run
TOY_MAX_STEPS = 100
# the loader workers of every run in the toy and synthetic worlds (``resolve_config``), the
# same on every machine: their images are tiny, so workers would cost more than they save
WORLD_LOADER_WORKERS = 0
# keys that do not change any number: left out of a run's identity.  Each one is proven not to
# move a prediction or a learned tensor by tests/test_identity_audit.py, which fails when a key
# is added here without a case of its own.  (DATALOADER.NUM_WORKERS is not one of them: the
# worker count decides the training crops, see benchmark.workers.worker_count.)
_NOT_IDENTITY = ("OUTPUT_DIR", "DATASET.ROOT", "TRAIN.PRINT_FREQ", "USE_CUDA", "SPEED")


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class EvalSpec:
    name: str  # column in the tables: "base", "novel", "test"
    dataset: str
    subsample: str = "all"  # class subset of that dataset: all, base, new


@dataclass
class RunSpec:
    method: str
    protocol: str
    stage: str  # e.g. "train_base"
    dataset: str
    seed: int
    shots: int
    subsample: str
    backbone: str
    backbone_id: str
    evals: tuple[EvalSpec, ...]
    config: dict = field(repr=False)  # resolved config (plain dict)
    # --grid sweeps (benchmark.grid): the run's grid point (config key -> value, already in
    # ``config``) and whether it is the run the command gives without the grid.  Neither is
    # part of the identity: the config is.
    grid: dict = field(default_factory=dict)
    grid_plain: bool = False

    @property
    def method_version(self) -> int:
        return get_method(self.method).version

    @property
    def run_id(self) -> str:
        return run_identity(self)

    @property
    def label(self) -> str:
        point = " [" + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.grid.items()) + "]" if self.grid else ""
        return f"{self.method}/{self.protocol}/{self.dataset}/shots{self.shots}/seed{self.seed}{point}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["evals"] = [asdict(e) for e in self.evals]
        return data


def _strip(config: dict, dotted: str) -> None:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.get(key, {})
    node.pop(last, None)


def changes_numbers(key: str) -> bool:
    """Whether a config key can change a run's numbers (is part of its identity)."""
    return not any(key == k or key.startswith(k + ".") for k in _NOT_IDENTITY)


def identity_config(config: dict, method: str, drop: Sequence[str] = ()) -> dict:
    """The part of a resolved config that enters a run's identity: without the keys that
    change no number, other methods' options, and options added later at the value that
    gives the earlier computation (``register_method(neutral=...)``); ``drop``: more keys to leave out."""
    config = json.loads(json.dumps(config))
    for key in (*_NOT_IDENTITY, *drop):
        _strip(config, key)
    # only the run's own method options: registering another method (a plugin, a new file
    # in methods/) adds its defaults to every config but changes no run's numbers
    info = get_method(method)
    config["TRAINER"] = {k: v for k, v in config.get("TRAINER", {}).items() if k in ("NAME", info.node)}
    options = config["TRAINER"].get(info.node, {})
    for key, value in info.neutral.items():  # options added later, at the value of the earlier records
        if key in options and options[key] == value:
            del options[key]
    return config


def identity_payload(run) -> dict:
    """Everything that can change the numbers of a run, as plain data: ``run`` is a
    ``RunSpec`` or a record (a record holds the same fields, and its resolved config).

    The transfer run's evaluation targets are not part of it: they only add evaluations
    of the same trained weights; nor are other methods' options or the fast paths."""
    get = (lambda key: run[key]) if isinstance(run, dict) else (lambda key: getattr(run, key))
    evals = [e if isinstance(e, dict) else asdict(e) for e in get("evals")]
    version = run.get("method_version", 1) if isinstance(run, dict) else run.method_version
    return {
        "method": get("method"), "method_version": version, "protocol": get("protocol"),
        "stage": get("stage"), "dataset": get("dataset"), "seed": get("seed"), "shots": get("shots"),
        "subsample": get("subsample"), "backbone_id": get("backbone_id"),
        "evals": [] if get("protocol") == TRANSFER else [
            {"name": e["name"], "dataset": e["dataset"], "subsample": e.get("subsample", "all")} for e in evals],
        "config": identity_config(get("config"), get("method")),
    }


def run_identity(spec: RunSpec) -> str:
    """A short hash of ``identity_payload``: the name of the run's record."""
    text = json.dumps(identity_payload(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def method_yaml(method: str, variants: Sequence[str]) -> dict:
    """The method's official YAML with the variants (protocol, dataset or world names) that apply, in order."""
    info = get_method(method)
    if info.config_file is None:
        return {}
    data = C.read_yaml(info.config_file)
    table = data.pop("VARIANTS", {}) or {}
    merged = json.loads(json.dumps(data))
    for name in variants:
        if name in table:
            _deep_update(merged, table[name])
    return merged


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def config_variants(protocol: str, dataset: str, shots: int, world: str) -> list[str]:
    """The names of the YAML variants that apply to a run, in the order they are merged."""
    if protocol == TRANSFER:
        names = [dataset, "cross_dataset"]
    elif protocol == "few_shot":
        names = ["few_shot", f"few_shot_{shots}", dataset, f"few_shot_{dataset}"]
    else:
        names = [protocol, dataset]
    return names + (["toy"] if world == "toy" else [])


def toy_epochs(epochs: int, warmup: int, train_size: int, batch_size: int, max_steps: int | None = None) -> int:
    """The toy world's schedule rule: the official warm-up epochs, then the official
    schedule cut to the most whole epochs that take at most ``max_steps``
    (``TOY_MAX_STEPS``) optimiser steps, and at least one.  An epoch takes
    ``train_size // batch_size`` steps, or one where the training set is smaller than a
    batch (the train loader drops the last incomplete batch)."""
    max_steps = TOY_MAX_STEPS if max_steps is None else max_steps
    if epochs <= 0 or train_size <= 0:
        return epochs
    warmup = min(max(warmup, 0), epochs - 1)
    per_epoch = max(1, train_size // max(1, batch_size))
    return min(epochs, warmup + max(1, max_steps // per_epoch))


def _apply_toy_schedule(cfg: CN, info: MethodInfo, root: str, dataset: str, shots: int, subsample: str) -> None:
    """``toy_epochs`` on ``cfg``; the method's options counted in epochs
    (``MethodInfo.epoch_options``) are scaled by the same factor."""
    from datasets.toy import train_size

    n = train_size(root, dataset, shots, subsample)
    official = int(cfg.OPTIM.MAX_EPOCH)
    if not n or official <= 0:
        return
    epochs = toy_epochs(official, int(cfg.OPTIM.WARMUP_EPOCH), n, int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE))
    cfg.OPTIM.MAX_EPOCH = epochs
    node = cfg.TRAINER.get(info.node)
    for key in info.epoch_options if epochs != official else ():
        node[key] = float(node[key]) * epochs / official


def resolve_config(method: str, protocol: str, dataset: str, *, seed: int, shots: int,
                   subsample: str, root: str, backbone: str, user_yaml: str | None = None,
                   opts: Sequence[str] = (), source: str = "command-line opts") -> CN:
    """defaults < method YAML (+ variants) < user YAML < protocol keys < KEY VALUE opts.

    Variants (``config_variants``): the protocol's, then the dataset's, then the world's.
    In the toy world the schedule rule (``toy_epochs``) then shortens ``OPTIM.MAX_EPOCH``,
    and in the toy and synthetic worlds ``DATALOADER.NUM_WORKERS`` is
    ``WORLD_LOADER_WORKERS`` (both after the user YAML, before the opts: an explicit
    ``--opts OPTIM.MAX_EPOCH`` or ``--opts DATALOADER.NUM_WORKERS`` wins).
    """
    from datasets.worlds import world_of

    info = get_method(method)
    cfg = C.get_cfg_default()
    add_method_defaults(cfg)
    world = world_of(root)
    variants = config_variants(protocol, dataset, shots, world)
    C.merge_dict(cfg, method_yaml(method, variants), f"methods/configs/{method}.yaml")
    if user_yaml:
        C.merge_dict(cfg, C.read_yaml(user_yaml), str(user_yaml))
    if world == "toy":
        _apply_toy_schedule(cfg, info, root, dataset, shots, subsample)
    if world in ("toy", "synthetic"):  # fixed, so that their numbers are the same on every machine
        cfg.DATALOADER.NUM_WORKERS = WORLD_LOADER_WORKERS
    cfg.SEED = seed
    cfg.DATASET.NAME = dataset
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.TRAINER.NAME = info.node
    C.merge_opts(cfg, opts, source=source)
    cfg.freeze()
    return cfg


def _spec(method: str, protocol: str, stage: str, dataset: str, seed: int, shots: int, subsample: str,
          evals: tuple[EvalSpec, ...], *, root: str, backbone: str, backbone_id: str,
          user_yaml: str | None = None, opts: Sequence[str] = ()) -> RunSpec:
    cfg = resolve_config(method, protocol, dataset, seed=seed, shots=shots, subsample=subsample,
                         root=root, backbone=backbone, user_yaml=user_yaml, opts=opts)
    return RunSpec(method=method, protocol=protocol, stage=stage, dataset=dataset, seed=seed,
                   shots=shots, subsample=subsample, backbone=backbone, backbone_id=backbone_id,
                   evals=evals, config=C.to_dict(cfg))


def _shot_list(shots: Sequence[int] | int) -> list[int]:
    return [shots] if isinstance(shots, int) else list(shots)


def base2novel(methods: Iterable[str], datasets: Iterable[str], seeds: Iterable[int],
               shots: Sequence[int] | int, **common) -> list[RunSpec]:
    shots = _shot_list(shots)
    return [_spec(method, "base2novel", "train_base", dataset, seed, k, "base",
                  (EvalSpec("base", dataset, "base"), EvalSpec("novel", dataset, "new")), **common)
            for method in methods for dataset in datasets for k in shots for seed in seeds]


def transfer(methods: Iterable[str], targets: Sequence[str], seeds: Iterable[int],
             shots: Sequence[int] | int, **common) -> list[RunSpec]:
    """One ImageNet training per method, shot count and seed, evaluated on ImageNet and the targets."""
    shots = _shot_list(shots)
    evals = tuple(EvalSpec(name, name, "all") for name in ["imagenet", *targets])
    return [_spec(method, TRANSFER, "train_imagenet", "imagenet", seed, k, "all", evals, **common)
            for method in methods for k in shots for seed in seeds]


def few_shot(methods: Iterable[str], datasets: Iterable[str], seeds: Iterable[int],
             shots: Sequence[int] | int, **common) -> list[RunSpec]:
    shots = _shot_list(shots)
    return [_spec(method, "few_shot", "train_all", dataset, seed, k, "all",
                  (EvalSpec("test", dataset, "all"),), **common)
            for method in methods for dataset in datasets for k in shots for seed in seeds]


def parse_protocols(text: str) -> list[str]:
    """``all``, one protocol or a comma-separated list -> protocol names in canonical order."""
    import difflib

    names = [p.strip() for p in str(text).split(",") if p.strip()]
    if not names:
        raise ProtocolError("No protocol given. Use one of: " + ", ".join(PROTOCOLS) + ", all.")
    chosen = set()
    for name in names:
        if name == "all":
            chosen.update(PROTOCOLS)
        elif name in PROTOCOLS:
            chosen.add(name)
        else:
            close = difflib.get_close_matches(name, [*PROTOCOLS, "all"], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ProtocolError(f"Unknown protocol '{name}'.{hint} Available: {', '.join(PROTOCOLS)}, all "
                                f"(or a comma-separated list).")
    return [p for p in PROTOCOLS if p in chosen]


def protocol_datasets(protocol: str, datasets: Sequence[str] | None) -> list[str]:
    """The datasets a protocol uses: its defaults, or those of ``datasets`` that it has.
    For cross_dataset and domain_generalization these are the evaluation targets."""
    from datasets.catalog import BASE2NOVEL_DATASETS, CROSS_DATASET_TARGETS, DG_DATASETS

    default = {"base2novel": BASE2NOVEL_DATASETS, "few_shot": BASE2NOVEL_DATASETS,
               "cross_dataset": CROSS_DATASET_TARGETS, "domain_generalization": DG_DATASETS}[protocol]
    return list(default) if datasets is None else [d for d in datasets if d in default]


def expand(protocol: str, *, methods: Sequence[str], datasets: Sequence[str] | None = None,
           seeds: Sequence[int] = DEFAULT_SEEDS, shots: Sequence[int] | int | None = None,
           **common) -> list[RunSpec]:
    """The run specs of one or several protocols (``all``, a name or a comma-separated list).

    ``datasets`` None means each protocol's own datasets; otherwise each protocol keeps the
    given datasets it has (the transfer run trains on ImageNet whatever the list says, and
    evaluates on the listed targets).  ``shots`` None means 16, and 1 2 4 8 16 for few_shot.
    The shared ImageNet training appears once, evaluated on every target asked for."""
    if isinstance(shots, int):
        shots = [shots]
    chosen = parse_protocols(protocol)
    specs: list[RunSpec] = []
    targets: list[str] = []
    for name in chosen:
        names = protocol_datasets(name, datasets)
        if name == "base2novel" and names:
            specs += base2novel(methods, names, seeds, shots or [DEFAULT_SHOTS], **common)
        elif name == "few_shot" and names:
            specs += few_shot(methods, names, seeds, shots or list(FEW_SHOT_SHOTS), **common)
        elif name in ("cross_dataset", "domain_generalization"):
            targets += names
    if targets:
        specs += transfer(methods, targets, seeds, shots or [DEFAULT_SHOTS], **common)
    if not specs:
        raise ProtocolError(f"No runs: none of the datasets {list(datasets or [])} belongs to the protocol(s) "
                            f"{', '.join(chosen)}. Leave --datasets out to use each protocol's datasets.")
    return specs


def spec_from_dict(data: dict) -> RunSpec:
    data = dict(data)
    data["evals"] = tuple(EvalSpec(**e) for e in data["evals"])
    return RunSpec(**data)


def config_node(spec: RunSpec) -> CN:
    node = C._to_node(json.loads(json.dumps(spec.config)))
    for key in ("SIZE", "RRCROP_SCALE"):
        node.INPUT[key] = tuple(node.INPUT[key])
    node.freeze()
    return node


def read_spec_file(path: str | Path) -> RunSpec:
    return spec_from_dict(json.loads(Path(path).read_text()))
