"""Protocols turn (methods, datasets, seeds, shots) into run specs.

A run spec is plain data: what to train (method, dataset, class subset, shots, seed,
backbone, config) and what to evaluate afterwards (named evaluation splits).  Its
identity is a hash of everything that can change a number, so a finished run is never
repeated and an interrupted sweep resumes where it stopped.

base2novel (CoCoOp / MaPLe / MMA): for each dataset and seed, train on the base half of
the classes with K shots (the K-shot draw is over all classes, then the base half is
kept), evaluate on the base test classes ("base") and on the new test classes ("novel")
with the same trained model.  HM = 2BN / (B + N) of the seed-averaged B and N.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from yacs.config import CfgNode as CN

from benchmark import config as C
from methods.registry import add_method_defaults, get_method

PROTOCOLS = ("base2novel",)
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_SHOTS = 16
# keys that do not change any number: left out of a run's identity
_NOT_IDENTITY = ("OUTPUT_DIR", "DATASET.ROOT", "DATALOADER.NUM_WORKERS", "TRAIN.PRINT_FREQ", "USE_CUDA")


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

    @property
    def method_version(self) -> int:
        return get_method(self.method).version

    @property
    def run_id(self) -> str:
        return run_identity(self)

    @property
    def label(self) -> str:
        return f"{self.method}/{self.protocol}/{self.dataset}/shots{self.shots}/seed{self.seed}"

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


def run_identity(spec: RunSpec) -> str:
    """A short hash of everything that can change the numbers of a run."""
    config = json.loads(json.dumps(spec.config))
    for key in _NOT_IDENTITY:
        _strip(config, key)
    payload = {
        "method": spec.method, "method_version": spec.method_version, "protocol": spec.protocol,
        "stage": spec.stage, "dataset": spec.dataset, "seed": spec.seed, "shots": spec.shots,
        "subsample": spec.subsample, "backbone_id": spec.backbone_id,
        "evals": [asdict(e) for e in spec.evals], "config": config,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
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


def resolve_config(method: str, protocol: str, dataset: str, *, seed: int, shots: int,
                   subsample: str, root: str, backbone: str, user_yaml: str | None = None,
                   opts: Sequence[str] = ()) -> CN:
    """defaults < method YAML (+ variants) < user YAML < protocol keys < KEY VALUE opts.

    Variants: the protocol's, then the dataset's, then the world's (``toy`` for a toy-world
    root, which wins: it only shortens schedules that a CPU cannot afford).
    """
    from datasets.toy import world_of

    info = get_method(method)
    cfg = C.get_cfg_default()
    add_method_defaults(cfg)
    variants = [protocol, dataset] + (["toy"] if world_of(root) == "toy" else [])
    C.merge_dict(cfg, method_yaml(method, variants), f"methods/configs/{method}.yaml")
    if user_yaml:
        C.merge_dict(cfg, C.read_yaml(user_yaml), str(user_yaml))
    cfg.SEED = seed
    cfg.DATASET.NAME = dataset
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.TRAINER.NAME = info.node
    C.merge_opts(cfg, opts)
    cfg.freeze()
    return cfg


def base2novel(methods: Iterable[str], datasets: Iterable[str], seeds: Iterable[int], shots: int,
               *, root: str, backbone: str, backbone_id: str, user_yaml: str | None = None,
               opts: Sequence[str] = ()) -> list[RunSpec]:
    specs = []
    for method in methods:
        for dataset in datasets:
            for seed in seeds:
                cfg = resolve_config(method, "base2novel", dataset, seed=seed, shots=shots,
                                     subsample="base", root=root, backbone=backbone,
                                     user_yaml=user_yaml, opts=opts)
                specs.append(RunSpec(
                    method=method, protocol="base2novel", stage="train_base", dataset=dataset,
                    seed=seed, shots=shots, subsample="base", backbone=backbone,
                    backbone_id=backbone_id,
                    evals=(EvalSpec("base", dataset, "base"), EvalSpec("novel", dataset, "new")),
                    config=C.to_dict(cfg)))
    return specs


def expand(protocol: str, **kwargs) -> list[RunSpec]:
    if protocol in ("base2novel", "all"):
        return base2novel(**kwargs)
    raise ProtocolError(f"Unknown protocol '{protocol}'. Available: {', '.join(PROTOCOLS)}, all.")


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
