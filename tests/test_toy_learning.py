"""Learning checks in the toy world, with the shipped toy CLIP and real toy datasets on disk.

These are the harness's real learning signal: zero-shot transfer above chance on classes
never seen as labels, and trained methods that beat zero-shot on their base classes.
"""

from __future__ import annotations

import pytest

from benchmark import cli, predictions, store
from benchmark.backbone import WEIGHTS_DIR
from benchmark.protocols import toy_epochs
from datasets.toy import build_tasks, train_size, write_toy_root

SLOTS = ["caltech101", "ucf101", "eurosat", "sun397"]
SIZES = {"train": 16, "val": 2, "test": 12}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_toy_root(root, SLOTS, sizes=SIZES)
    return root


def _records(root, out, methods, datasets, *opts):
    # in this process: a handful of runs does not pay for starting worker processes
    args = ["run", "--methods", methods, "--datasets", datasets, "--seeds", "1", "--root", str(root),
            "--output", str(out), "--workers", "1"]
    if opts:
        args += ["--opts", *opts]
    assert cli.main(args) == 0
    return {(r["method"], r["dataset"]): r for r in store.iter_records(out)}


def _zero_shot_novel(root, record):
    """Zero-shot CLIP on the novel test images of ``record``'s run, recomputed here: which images
    have a prediction that rounding cannot flip, and the predictions."""
    import torch
    from tolerance import clip_ops, decisive, logit_scale

    import benchmark
    from benchmark.backbone import load_clip
    from benchmark.loaders import eval_inputs
    from benchmark.models import dataset_context, prepare_model
    from benchmark.trainer import batch_logits
    from datasets.build import build_dataset

    data = build_dataset(record["dataset"], root, num_shots=16, seed=1, subsample="new")
    cfg = benchmark.make_config("zsclip", record["dataset"], **{"INPUT.SIZE": tuple(record["effective_input_size"])})
    cfg.freeze()
    clip = load_clip(record["backbone"], "cpu")
    context = dataset_context(record["dataset"], data.classnames, world="toy")
    model = prepare_model("zsclip", cfg, context, device=torch.device("cpu"), clip=clip)[0]
    with torch.no_grad():
        logits = torch.cat(list(batch_logits(model, data.test, eval_inputs(model, cfg, torch.device("cpu")), "fp32")))
    keep = decisive(logits, ops=clip_ops(model.clip), scale=logit_scale(model.clip))
    return keep.numpy(), logits.argmax(dim=-1).numpy()


def test_the_toy_clip_is_shipped_with_its_recipe():
    import json

    weights = WEIGHTS_DIR / "toy-clip.pt"
    sidecar = json.loads((WEIGHTS_DIR / "toy-clip.json").read_text())
    assert weights.stat().st_size == sidecar["weights_bytes"] < 8 * 2**20
    assert sidecar["reproduce"].startswith("python -m benchmark.toy_pretrain --out benchmark/weights/toy-clip.pt")
    assert sidecar["zero_shot"]["composition_novel"]["accuracy"] > 5 * sidecar["zero_shot"]["composition_novel"]["chance"]


@pytest.mark.slow
def test_zero_shot_transfers_to_unseen_labels_and_trained_methods_beat_it(toy_root, tmp_path):
    records = _records(toy_root, tmp_path / "zs", "zsclip", ",".join(SLOTS))
    assert all(r["world"] == "toy" and r["backbone"] == "toy-clip" for r in records.values())
    tasks = build_tasks()
    # pattern-shape classes in hue-rotated photos, and colour-shape pairs that pre-training
    # never showed (washed-out paintings and pixel art): far above chance on the novel half
    for slot in ("caltech101", "ucf101"):
        n_novel = len(tasks[slot].names) - (len(tasks[slot].names) + 1) // 2
        novel = records[("zsclip", slot)]["metrics"]["novel"]
        assert novel["n_classes"] == n_novel
        assert novel["accuracy"] > 3 * 100 / n_novel, (slot, novel)

    # MMA (official settings, longer schedule) on inverted-colour scenes, where zero-shot is weak
    mma = _records(toy_root, tmp_path / "mma", "mma", "eurosat", "OPTIM.MAX_EPOCH", "20")[("mma", "eurosat")]
    zs = records[("zsclip", "eurosat")]
    assert mma["metrics"]["base"]["accuracy"] >= zs["metrics"]["base"]["accuracy"] + 15, (mma["metrics"], zs["metrics"])
    losses = mma["train"]["epoch_losses"]
    assert min(losses[-3:]) < losses[0]

    # CoOp (its official 200 epochs cut by the toy world's schedule rule) on washed-out scenes
    coop = _records(toy_root, tmp_path / "coop", "coop", "sun397")[("coop", "sun397")]
    rule = toy_epochs(200, 1, train_size(toy_root, "sun397", 16, "base"), 32)
    assert coop["config"]["OPTIM"]["MAX_EPOCH"] == rule < 200  # the rule's schedule, recorded
    zs = records[("zsclip", "sun397")]
    assert coop["metrics"]["base"]["accuracy"] >= zs["metrics"]["base"]["accuracy"] + 10, (coop["metrics"], zs["metrics"])
    assert coop["train"]["epoch_losses"][-1] < coop["train"]["epoch_losses"][0]

    # CoCoOp (official settings: batch 1, 10 epochs, cut by the rule) on the same slot
    cocoop = _records(toy_root, tmp_path / "cocoop", "cocoop", "sun397")[("cocoop", "sun397")]
    assert cocoop["metrics"]["base"]["accuracy"] >= zs["metrics"]["base"]["accuracy"] + 10, (cocoop["metrics"], zs["metrics"])
    assert cocoop["train"]["epoch_losses"][-1] < cocoop["train"]["epoch_losses"][0]



@pytest.mark.slow
def test_every_other_baseline_beats_zero_shot_on_its_base_classes(toy_root, tmp_path):
    """Each baseline with its official configs (schedules cut by the toy world's rule) on the
    inverted-colour eurosat slot, where zero-shot is weak (KgCoOp too: its pull towards the
    hand-written prompt still leaves it far above zero-shot there)."""
    zs = _records(toy_root, tmp_path / "zs", "zsclip", "eurosat")
    methods = ["maple", "clip_adapter", "tip_adapter", "tip_adapter_f", "linear_probe", "promptsrc", "kgcoop"]
    records = _records(toy_root, tmp_path / "eurosat", ",".join(m for m in methods if m != "clip_adapter"), "eurosat")
    # CLIP-Adapter's residual adapter does not move its predictions in the rule's 100 steps
    # (README: where the toy world disagrees); with its own 200 epochs it learns
    records.update(_records(toy_root, tmp_path / "adapter", "clip_adapter", "eurosat", "OPTIM.MAX_EPOCH", "200"))
    zs_base = zs[("zsclip", "eurosat")]["metrics"]["base"]["accuracy"]
    for name in methods:
        base = records[(name, "eurosat")]["metrics"]["base"]["accuracy"]
        assert base >= zs_base + 15, (name, base, zs_base)
    # the cache has no images of novel classes: Tip-Adapter is its zero-shot classifier there,
    # computed another way (a template ensemble's normalised mean, a factor 100): the same
    # predictions wherever rounding cannot flip a near tie
    zs_record = zs[("zsclip", "eurosat")]
    zs_novel = zs_record["metrics"]["novel"]
    keep, zs_pred = _zero_shot_novel(toy_root, zs_record)
    assert keep.any() and (zs_pred[keep] == predictions.load(tmp_path / "zs", zs_record)["novel"].pred[keep]).all()
    for name in ("tip_adapter", "tip_adapter_f"):
        record = records[(name, "eurosat")]
        assert (predictions.load(tmp_path / "eurosat", record)["novel"].pred[keep] == zs_pred[keep]).all(), name
        assert abs(record["metrics"]["novel"]["n_correct"] - zs_novel["n_correct"]) <= int((~keep).sum()), name
    assert records[("linear_probe", "eurosat")]["metrics"]["novel"]["status"] == "not_applicable"
    kgcoop = records[("kgcoop", "eurosat")]
    assert kgcoop["train"]["epoch_losses"][-1] < kgcoop["train"]["epoch_losses"][0]
