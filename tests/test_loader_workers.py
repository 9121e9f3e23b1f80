"""Loader workers as the reference toolbox runs them.

The reference trainer builds its train loader with ``DATALOADER.NUM_WORKERS`` workers as
configured, whatever the machine.  When an epoch's iterator starts, the loader draws a base
seed from the global generator, then its RandomSampler draws a seed of its own for the
epoch's permutation; worker w of N seeds ``random`` and torch with base seed + w and
augments batches w, w + N, w + 2N, ... in turn.  So the worker count decides which random
crops a run trains on.  ``_reference_epoch`` re-implements that here, independently of the
loader, and the harness's loader and whole training runs are held against it with 8 workers
on a machine with fewer cores.  The count is part of a run's identity and is recorded.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from PIL import Image

from benchmark import store
from benchmark.loaders import train_loader
from benchmark.models import dataset_context, prepare_model
from benchmark.protocols import WORLD_LOADER_WORKERS, base2novel, config_node, resolve_config
from benchmark.trainer import epoch_learning_rates, execute, set_random_seed, train
from benchmark.transforms import build_train_transform
from benchmark.workers import worker_count
from datasets.build import build_dataset
from tolerance import assert_close, clip_ops, ops, tolerance

CPU = torch.device("cpu")
WORKERS = 8  # the official configs' count; more than this machine's cores in CI


def _reference_epoch(data, transform, batch_size: int, drop_last: bool, workers: int):
    """One epoch of the reference train loader with ``workers`` (> 0) worker processes, run
    here in this process: [(images, labels)] per batch.  The main generator is advanced as
    the reference loader advances it; each worker's streams are its own."""
    base_seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as the iterator starts
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_().item())  # the sampler's first draw
    generator = torch.Generator()
    generator.manual_seed(sampler_seed)
    order = torch.randperm(len(data), generator=generator).tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    states: dict[int, tuple] = {}
    out = []
    kept = random.getstate()
    with torch.random.fork_rng(devices=[]):
        for k, indices in enumerate(batches):
            worker = k % workers
            if worker in states:  # the worker goes on with its own streams
                torch.set_rng_state(states[worker][0])
                random.setstate(states[worker][1])
            else:  # the worker starts: its streams seeded from the base seed and its index
                torch.manual_seed(base_seed + worker)
                random.seed(base_seed + worker)
            images = [transform(Image.open(data[i].impath).convert("RGB")) for i in indices]
            states[worker] = (torch.get_rng_state(), random.getstate())
            out.append((torch.stack(images), torch.tensor([data[i].label for i in indices])))
    random.setstate(kept)
    return out


def _spec(root, method: str, workers: int, *opts: str):
    return base2novel([method], ["eurosat"], [1], 4, root=str(root), backbone="tiny-clip-12", backbone_id="tiny",
                      opts=["DATALOADER.NUM_WORKERS", str(workers), "DATALOADER.TRAIN_X.BATCH_SIZE", "2",
                            "OPTIM.MAX_EPOCH", "2", "INPUT.SIZE", "(32, 32)", *opts])[0]


def _data(spec):
    return build_dataset(spec.dataset, spec.config["DATASET"]["ROOT"], num_shots=spec.shots, seed=spec.seed,
                         subsample=spec.subsample)


def _reference_batches(data, cfg, epochs: int, workers: int):
    batch = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
    return [_reference_epoch(data, build_train_transform(cfg), batch, len(data) >= batch, workers)
            for _ in range(epochs)]


def _harness_batches(data, cfg, epochs: int):
    loader = train_loader(data, cfg, CPU)
    assert loader.num_workers == worker_count(cfg)
    return [list(loader) for _ in range(epochs)]


def _close(x: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the few roundings of the transforms (the rule of tests/tolerance.py)."""
    rtol, atol = tolerance(expected, ops=ops(1, 3), scale=0.0)
    return x.shape == expected.shape and torch.allclose(x, expected, rtol=rtol, atol=atol)


def _same_batches(got, expected) -> bool:
    return len(got) == len(expected) and all(
        len(a) == len(b) and all(torch.equal(la, lb) and _close(xa, xb) for (xa, la), (xb, lb) in zip(a, b))
        for a, b in zip(got, expected))


@pytest.mark.parametrize("fast", [True, False], ids=["fast-paths", "plain"])
def test_train_batches_are_the_reference_loaders_with_8_workers(synthetic_root, fast):
    cfg = config_node(_spec(synthetic_root, "coop", WORKERS, "SPEED.ENABLED", str(fast)))
    data = _data(_spec(synthetic_root, "coop", WORKERS)).train
    set_random_seed(1)
    ours = _harness_batches(data, cfg, 2)
    after_ours = torch.rand(3)
    set_random_seed(1)
    reference = _reference_batches(data, cfg, 2, WORKERS)
    assert torch.equal(torch.rand(3), after_ours)  # the main generator advanced alike (copies of one stream)
    assert len(reference[0]) == len(data) // 2 > WORKERS  # every worker used, some twice
    for epoch, (mine, theirs) in enumerate(zip(ours, reference)):
        assert len(mine) == len(theirs)
        for k, ((x, y), (rx, ry)) in enumerate(zip(mine, theirs)):
            assert torch.equal(y, ry), (epoch, k)  # labels: integers
            # decoding and the transforms are the same operations; ToTensor and Normalize per
            # batch or per image round the same (element-wise), so the bound is a few roundings
            assert_close(x, rx, ops=ops(1, 3), scale=0.0, what=f"epoch {epoch} batch {k}")


def test_another_worker_count_draws_other_crops(synthetic_root):
    """The hostile side: the count is not neutral, so it must be part of the identity."""
    cfg8 = config_node(_spec(synthetic_root, "coop", WORKERS))
    cfg2 = config_node(_spec(synthetic_root, "coop", 2))
    data = _data(_spec(synthetic_root, "coop", 2)).train
    set_random_seed(1)
    with_two = _harness_batches(data, cfg2, 1)
    set_random_seed(1)
    reference = _reference_batches(data, cfg8, 1, WORKERS)
    assert not _same_batches(with_two, reference)
    set_random_seed(1)
    assert _same_batches(with_two, _reference_batches(data, cfg2, 1, 2))  # the same rule with 2 workers


def _reference_run(model, batches, cfg):
    """The reference trainer's loop on the reference loader's batches: SGD with the
    configured momentum and weight decay, the epoch's rate set before its first step."""
    o = cfg.OPTIM
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=o.LR, momentum=o.MOMENTUM, weight_decay=o.WEIGHT_DECAY,
                                dampening=o.SGD_DAMPNING, nesterov=o.SGD_NESTEROV)
    for lr, epoch in zip(epoch_learning_rates(cfg), batches):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for images, labels in epoch:
            loss = model.loss(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@pytest.mark.parametrize("method", ["coop", "mma"])
def test_a_whole_run_with_8_workers_equals_the_reference_trainers(synthetic_root, tiny_clip, method):
    spec = _spec(synthetic_root, method, WORKERS, "OPTIM.LR", "0.05")
    cfg = config_node(spec)
    dataset = _data(spec)
    told = dataset_context(dataset.name, dataset.classnames, world="synthetic", shots=spec.shots)
    torch.manual_seed(1)
    model, _, precision = prepare_model(method, cfg, told, device=CPU, clip=tiny_clip)
    reference = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    set_random_seed(1)
    result = train(model, dataset.train, cfg, CPU, precision)
    set_random_seed(1)
    batches = _reference_batches(dataset.train, cfg, int(cfg.OPTIM.MAX_EPOCH), WORKERS)
    _reference_run(reference, batches, cfg)

    assert result.steps == sum(len(e) for e in batches) > WORKERS
    learned = dict(reference.named_parameters())
    budget = clip_ops(tiny_clip, passes=2) * result.steps
    moved = 0
    for name, value in model.named_parameters():
        if name in start:
            assert_close(value, learned[name], ops=budget, what=name)
            moved += not torch.allclose(value, start[name])
    assert moved  # training did something that the comparison can see
    model.eval(), reference.eval()
    images = torch.stack([build_train_transform(cfg)(Image.open(d.impath).convert("RGB")) for d in dataset.test[:8]])
    with torch.no_grad():
        logits = model(images)
        assert_close(logits, reference(images), ops=budget, what="test logits")


def test_the_worker_count_is_part_of_the_identity_and_recorded(synthetic_root, tmp_path):
    two, eight = _spec(synthetic_root, "coop", 2), _spec(synthetic_root, "coop", WORKERS)
    assert two.run_id != eight.run_id
    record = execute(two, CPU, output=tmp_path)
    store.write_json_atomic(store.record_path(tmp_path, two), record)
    assert record["environment"]["loader_workers"] == 2 == record["config"]["DATALOADER"]["NUM_WORKERS"]
    assert record["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["environment"]["threads"] == torch.get_num_threads()
    assert store.is_finished(tmp_path, two)
    assert not store.is_finished(tmp_path, eight)  # a request with 8 workers is another run


def test_configured_count_is_used_and_the_worlds_count_is_fixed(synthetic_root, tmp_path):
    real = resolve_config("coop", "base2novel", "eurosat", seed=1, shots=16, subsample="base", root=str(tmp_path),
                          backbone="x")
    assert real.DATALOADER.NUM_WORKERS == WORKERS == worker_count(real)  # the official count, uncapped
    world = resolve_config("coop", "base2novel", "eurosat", seed=1, shots=16, subsample="base",
                           root=str(synthetic_root), backbone="x")
    assert world.DATALOADER.NUM_WORKERS == WORLD_LOADER_WORKERS  # the same on every machine
    chosen = resolve_config("coop", "base2novel", "eurosat", seed=1, shots=16, subsample="base",
                            root=str(synthetic_root), backbone="x", opts=["DATALOADER.NUM_WORKERS", "3"])
    assert chosen.DATALOADER.NUM_WORKERS == 3  # an explicit choice wins
