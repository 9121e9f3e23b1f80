"""Config merge order, schedules, metrics, seeding and a real training run on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import benchmark
from benchmark import config as C
from benchmark.protocols import resolve_config
from benchmark.trainer import (
    classification_metrics,
    epoch_learning_rates,
    set_random_seed,
    train,
)
from datasets.build import build_dataset


def _cfg(**optim):
    cfg = C.get_cfg_default()
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    for key, value in optim.items():
        cfg.OPTIM[key] = value
    return cfg


def _cos(t, T):
    return (1 + math.cos(math.pi * t / T)) / 2


def test_mma_schedule_no_warmup():
    lrs = epoch_learning_rates(_cfg(LR=0.0015, MAX_EPOCH=5, WARMUP_EPOCH=0))
    assert lrs == pytest.approx([0.0015 * _cos(t, 5) for t in range(5)], rel=1e-12)
    assert lrs[:2] == pytest.approx([0.0015, 0.0015 * 0.9045084972], rel=1e-9)


def test_constant_warmup_shifts_the_cosine_by_one_epoch():
    # MaPLe: W=1 constant 1e-5, E=5 -> [1e-5, b, cos t=1, t=2, t=3]
    b = 0.0035
    lrs = epoch_learning_rates(_cfg(LR=b, MAX_EPOCH=5, WARMUP_EPOCH=1, WARMUP_TYPE="constant",
                                    WARMUP_CONS_LR=1e-5))
    assert lrs == pytest.approx([1e-5, b, b * 0.9045085, b * 0.6545085, b * 0.3454915], rel=1e-6)
    # MaPLe cross-dataset: W=1, E=2 -> one real epoch at full rate
    assert epoch_learning_rates(_cfg(LR=0.0026, MAX_EPOCH=2, WARMUP_EPOCH=1, WARMUP_TYPE="constant")) == \
        pytest.approx([1e-5, 0.0026])


def test_linear_warmup():
    lrs = epoch_learning_rates(_cfg(LR=0.01, MAX_EPOCH=6, WARMUP_EPOCH=2, WARMUP_TYPE="linear",
                                    WARMUP_MIN_LR=1e-5))
    assert lrs == pytest.approx([1e-5, 0.01 * 1 / 2, 0.01, 0.01 * _cos(1, 6), 0.01 * _cos(2, 6),
                                 0.01 * _cos(3, 6)], rel=1e-9)


def test_metrics_from_hand_counted_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])  # 7 of 10 right
    m = classification_metrics(labels, preds)
    assert m["accuracy"] == pytest.approx(70.0) and m["n_images"] == 10
    # class 0: tp 3 fp 1 fn 1 -> 6/8; class 1: tp 2 fp 2 fn 1 -> 4/7; class 2: tp 2 fp 0 fn 1 -> 4/5
    assert m["macro_f1"] == pytest.approx(100 * (6 / 8 + 4 / 7 + 4 / 5) / 3)


def test_merge_order_and_clear_errors(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("OPTIM:\n  LR: 0.01\n  MAX_EPOCH: 3\n")
    cfg = resolve_config("mma", "base2novel", "eurosat", seed=2, shots=4, subsample="base", root="r",
                         backbone="tiny-clip-12", user_yaml=str(user), opts=["OPTIM.MAX_EPOCH", "7"])
    assert cfg.OPTIM.NAME == "sgd"  # method YAML over the defaults ("adam")
    assert cfg.OPTIM.LR == 0.01  # user YAML over the method YAML (0.0015)
    assert cfg.OPTIM.MAX_EPOCH == 7  # opts over the user YAML
    assert cfg.TRAINER.MMADAPTER.ADAPTER_SCALE == 0.001 and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 16
    assert tuple(cfg.INPUT.SIZE) == (224, 224) and cfg.SEED == 2
    imnet = resolve_config("mma", "base2novel", "imagenet", seed=1, shots=16, subsample="base", root="r",
                           backbone="x")
    assert imnet.DATALOADER.TRAIN_X.BATCH_SIZE == 128  # the official ImageNet variant
    with pytest.raises(C.ConfigError, match="does not exist"):
        resolve_config("mma", "base2novel", "eurosat", seed=1, shots=16, subsample="base", root="r",
                       backbone="x", opts=["OPTIM.LRR", "0.1"])
    with pytest.raises(C.ConfigError, match="type"):
        resolve_config("mma", "base2novel", "eurosat", seed=1, shots=16, subsample="base", root="r",
                       backbone="x", opts=["OPTIM.MAX_EPOCH", "'five'"])


def test_seeding_matches_the_reference_order():
    set_random_seed(5)
    import random

    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def _set_loss(model, data, cfg):
    """Cross-entropy over the whole training set with the deterministic test transform."""
    from benchmark.loaders import test_loader

    model.eval()
    losses = []
    with torch.no_grad():
        for images, labels in test_loader(data, cfg, torch.device("cpu")):
            losses.append(torch.nn.functional.cross_entropy(model(images), labels, reduction="sum"))
    return torch.stack(losses).sum().item() / len(data)


def test_training_moves_only_the_adapters_and_lowers_the_loss(tiny_clip, synthetic_root):
    data = build_dataset("eurosat", synthetic_root, num_shots=8, seed=1, subsample="base")
    cfg = benchmark.make_config("mma", "eurosat", **{"OPTIM.MAX_EPOCH": 10, "DATALOADER.NUM_WORKERS": 0})
    cfg.INPUT.SIZE = (32, 32)
    cfg.freeze()
    torch.manual_seed(0)
    model = benchmark.build("mma", data.classnames, clip=tiny_clip)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    adapters = {k: v.clone() for k, v in model.adapter_learner.named_parameters()}
    before = _set_loss(model, data.train, cfg)
    result = train(model, data.train, cfg, torch.device("cpu"), "fp32")
    after = _set_loss(model, data.train, cfg)
    assert result.steps == 10 * max(1, len(data.train) // 16)
    assert result.learning_rates[0] == 0.0015 and len(result.epoch_losses) == 10
    assert after < before - 0.01  # a random CLIP: small but certain progress on the training set
    assert all(torch.equal(frozen[k], v) for k, v in model.clip.state_dict().items())
    assert any(not torch.equal(adapters[k], v) for k, v in model.adapter_learner.named_parameters())


def test_same_seed_same_record(synthetic_root):
    from benchmark.protocols import base2novel
    from benchmark.trainer import execute

    def spec(seed):
        return base2novel(["mma"], ["oxford_pets"], [seed], 4, root=str(synthetic_root), backbone="tiny-clip-12",
                          backbone_id="tiny", opts=["OPTIM.MAX_EPOCH", "2", "DATALOADER.NUM_WORKERS", "0"])[0]

    first, again, other = execute(spec(1), "cpu"), execute(spec(1), "cpu"), execute(spec(2), "cpu")
    assert first["metrics"]["base"]["accuracy"] == again["metrics"]["base"]["accuracy"]
    assert first["metrics"]["novel"]["accuracy"] == again["metrics"]["novel"]["accuracy"]
    assert first["train"]["epoch_losses"] == again["train"]["epoch_losses"]
    assert first["id"] == again["id"] != other["id"]
    assert first["train"]["epoch_losses"] != other["train"]["epoch_losses"]
    assert first["compute"]["precision_requested"] == "amp" and first["compute"]["precision"] == "fp32"
    assert first["compute"]["trainable_params"] == sum(
        8 * (2 * d * 32 + 32 + d) for d in (64, 128)) + 8 * (32 * 32 + 32)
