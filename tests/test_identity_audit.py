"""The identity audit: every key left out of a run's identity is proven not to move a number.

A run's identity (``benchmark.protocols.identity_payload``) names its record, so a finished
run is never repeated and two results folders can be merged.  It leaves out some config
keys (``_NOT_IDENTITY``: the output and data folders, print frequency, the device switch,
every ``SPEED`` key), the options of other methods, the options added later at their neutral
value (``register_method(neutral=...)``) and the transfer run's evaluation targets.  For each
of them, a tiny real run is made with the key changed and compared with the run without the
change: the same identity, every learned tensor and every test logit equal up to rounding
(``tests/tolerance.py``), and every test prediction equal except where the baseline's two
best logits lie within that rounding of each other.  ``CASES`` must name every excluded key:
a key added to the exclusions without a case of its own fails ``test_every_excluded_key_has_a_case``.
"""

from __future__ import annotations

import copy
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from benchmark import checkpoint as ckpt
from benchmark import config as C
from benchmark import predictions as per_image
from benchmark import protocols
from benchmark.backbone import clip_copy
from benchmark.loaders import eval_inputs
from benchmark.models import dataset_context, prepare_model
from benchmark.protocols import base2novel, config_node, transfer
from benchmark.trainer import batch_logits, execute
from benchmark.verify import rerun_config
from datasets.build import build_dataset
from methods.registry import get_method, list_methods
from tolerance import assert_close, clip_ops, tolerance

CPU = torch.device("cpu")
BOTH = ("coop", "mma")  # CoOp: frozen image features, shared prompt prefix; MMA: decoded images, frozen text
COPY_ROOT = "<a copy of the data root>"
OTHER = "TRAINER.<another method's node>"
TARGETS = "transfer evaluation targets"

# excluded key -> (the value it is changed to, the methods whose code it reaches)
CASES = {
    "OUTPUT_DIR": ("somewhere/else", BOTH),
    "DATASET.ROOT": (COPY_ROOT, BOTH),
    "TRAIN.PRINT_FREQ": ("1", BOTH),
    "USE_CUDA": ("False", BOTH),
    "SPEED.ENABLED": ("False", BOTH),
    "SPEED.TRUNCATE_TEXT": ("False", BOTH),
    "SPEED.SHARED_PREFIX": ("False", ("coop",)),
    "SPEED.FROZEN_TEXT": ("False", ("mma",)),
    "SPEED.FEATURE_CACHE": ("False", ("coop",)),
    "SPEED.IMAGE_CACHE": ("False", ("mma",)),
    "SPEED.MEMORY_IMAGES": ("False", BOTH),
    "SPEED.MEMORY_IMAGES_MB": ("0", BOTH),  # nothing fits: every image read from its file
    "SPEED.BATCH_TENSORS": ("False", BOTH),
    "SPEED.EVAL_BATCH_SIZE": ("3", BOTH),
    "SPEED.CACHE_DIR": ("", BOTH),  # the disk caches off
    OTHER: (None, BOTH),  # the other method's options, each changed
    "TRAINER.MMADAPTER.SHARED": (None, ("mma",)),  # absent, as in a record made before the key existed
    "TRAINER.MMADAPTER.TOWERS": (None, ("mma",)),
    TARGETS: (None, ("coop",)),
}
OTHER_OPTIONS = {"coop": ["TRAINER.MMADAPTER.ADAPTER_DIM", "8", "TRAINER.MMADAPTER.ADAPTER_START", "3"],
                 "mma": ["TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CLASS_TOKEN_POSITION", "front"]}


def excluded_keys() -> set[str]:
    """Every key the identity leaves out, from the code that leaves it out."""
    defaults = C.get_cfg_default()
    keys = set()
    for entry in protocols._NOT_IDENTITY:
        node = defaults
        for part in entry.split("."):
            node = node[part]
        keys |= {f"{entry}.{k}" for k in node} if isinstance(node, dict) else {entry}
    for name in list_methods():
        info = get_method(name)
        keys |= {f"TRAINER.{info.node}.{k}" for k in info.neutral}
    return keys | {OTHER, TARGETS}


def test_every_excluded_key_has_a_case():
    assert set(CASES) == excluded_keys()


# -- tiny runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from datasets.synthetic import write_synthetic_root

    root = tmp_path_factory.mktemp("audit-data")
    write_synthetic_root(root, ["eurosat", "imagenet", "oxford_pets"])
    return root


def _opts(cache: Path, *extra: str) -> list[str]:
    return ["OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "INPUT.SIZE", "(32, 32)", "SPEED.CACHE_DIR",
            str(cache), *extra]


def _spec(method: str, root: Path, cache: Path, *extra: str):
    return base2novel([method], ["eurosat"], [1], 4, root=str(root), backbone="tiny-clip-12",
                      backbone_id="tiny-clip-12", opts=_opts(cache, *extra))[0]


def _logits(spec, checkpoint: Path) -> dict[str, torch.Tensor]:
    """Each evaluation's test logits of the run's learned weights, through the evaluation
    path the run's config chooses (fast paths and caches included)."""
    cfg = config_node(spec)
    out = {}
    for ev in spec.evals:
        target = build_dataset(ev.dataset, cfg.DATASET.ROOT, num_shots=spec.shots, seed=spec.seed,
                               subsample=ev.subsample)
        told = dataset_context(target.name, target.classnames, world="synthetic", shots=spec.shots)
        torch.manual_seed(spec.seed)
        model, _, precision = prepare_model(spec.method, cfg, told, device=CPU, clip=clip_copy(spec.backbone))
        ckpt.load(model, checkpoint)
        model.use_dataset(told)
        inputs = eval_inputs(model, cfg, CPU, spec.backbone_id)
        out[ev.name] = torch.cat(list(batch_logits(model, target.test, inputs, precision)))
    return out


def _outcome(spec, tmp: Path) -> dict:
    out = tmp / uuid.uuid4().hex[:8]
    checkpoint = out / "learned.pt"
    record = execute(spec, CPU, output=out, checkpoint=checkpoint, save_checkpoint=True)
    return {"id": spec.run_id, "record": record, "preds": per_image.load(out, record),
            "state": torch.load(checkpoint, map_location="cpu", weights_only=True)["state"],
            "logits": _logits(spec, checkpoint)}


def _assert_same_numbers(changed: dict, base: dict, what: str) -> None:
    steps = max(1, base["record"]["train"]["steps"])
    budget = clip_ops(clip_copy("tiny-clip-12"), passes=2) * (steps + 1)
    assert changed["state"].keys() == base["state"].keys(), what
    for name, value in base["state"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert_close(changed["state"][name], value, ops=budget, what=f"{what}: learned {name}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(changed["state"][name], value), f"{what}: {name}"  # integers
        else:
            assert changed["state"][name] == value, f"{what}: {name}"
    for name, logits in base["logits"].items():
        assert_close(changed["logits"][name], logits, ops=budget, what=f"{what}: {name} logits")
        _, atol = tolerance(logits, ops=budget)
        top = logits.topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > 2 * atol  # a near tie may go either way by rounding
        assert clear.float().mean() > 0.5, f"{what}: most predictions must be clear for the audit to mean something"
        mine, theirs = changed["preds"][name].pred, base["preds"][name].pred
        assert (mine[clear.numpy()] == theirs[clear.numpy()]).all(), f"{what}: {name} predictions moved"
        assert changed["preds"][name].images == base["preds"][name].images


@pytest.fixture(scope="module")
def baselines(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit-runs")
    cache = tmp / "cache"
    return {m: _outcome(_spec(m, world, cache), tmp) for m in BOTH}, tmp


def _changed_spec(key: str, method: str, world: Path, tmp: Path):
    value, _ = CASES[key]
    cache = tmp / "cache"  # the baselines' caches: a changed run also reads what they left
    if key == "DATASET.ROOT":
        copy_root = tmp / "copied-root"
        if not copy_root.exists():
            shutil.copytree(world, copy_root)
        return _spec(method, copy_root, cache)
    if key == OTHER:
        return _spec(method, world, cache, *OTHER_OPTIONS[method])
    if key.startswith("TRAINER.MMADAPTER."):  # a record made before the key existed
        spec = _spec(method, world, cache)
        del spec.config["TRAINER"]["MMADAPTER"][key.rsplit(".", 1)[-1]]
        return spec
    return _spec(method, world, cache, key, value)


@pytest.mark.parametrize("key,method", [(k, m) for k, (_, methods) in CASES.items() if k != TARGETS
                                        for m in methods])
def test_an_excluded_key_moves_no_number(key, method, world, baselines):
    runs, tmp = baselines
    spec = _changed_spec(key, method, world, tmp)
    assert spec.run_id == runs[method]["id"], f"{key} changed the identity"
    if key not in spec.config.get("TRAINER", {}).get("MMADAPTER", {key: 0}):
        # the record lacks the key: running it again (``verify``) fills this harness's defaults
        spec = copy.deepcopy(spec)
        spec.config = rerun_config(spec.to_dict(), str(world), str(tmp / "cache"))
    _assert_same_numbers(_outcome(spec, tmp), runs[method], f"{method} with {key} changed")


def test_transfer_targets_are_not_identity_and_move_no_number(world, tmp_path):
    cache = tmp_path / "cache"
    one, two = (transfer(["coop"], targets, [1], 2, root=str(world), backbone="tiny-clip-12",
                         backbone_id="tiny-clip-12", opts=_opts(cache))[0]
                for targets in (["eurosat"], ["eurosat", "oxford_pets"]))
    assert one.run_id == two.run_id
    a, b = _outcome(one, tmp_path), _outcome(two, tmp_path)
    b = {**b, "logits": {k: v for k, v in b["logits"].items() if k in a["logits"]}}
    _assert_same_numbers(b, a, "coop transfer with another target")


def test_the_audit_sees_a_key_that_moves_numbers(world, baselines):
    """The comparison is not blind: the loader worker count (an identity key) is caught."""
    runs, tmp = baselines
    spec = _spec("coop", world, tmp / "cache", "DATALOADER.NUM_WORKERS", "2")
    assert spec.run_id != runs["coop"]["id"]
    with pytest.raises(AssertionError):
        _assert_same_numbers(_outcome(spec, tmp), runs["coop"], "coop with 2 loader workers")
