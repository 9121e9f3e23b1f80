"""One run: data, model, optimiser, epochs, evaluation -> a record.

Reproduces the reference toolbox's training semantics (the README's "Training semantics
reproduced"): seeding of ``random``, numpy and torch in that order before the data is built;
few-shot sampling from the dataset code; a RandomSampler loader that drops the last
incomplete batch when there is at least one full batch; SGD (or Adam) over the method's
trainable parameters; a learning rate that changes once per epoch, after the epoch's
last step (cosine with the constant/linear warm-up wrappers); the last-epoch model is
evaluated (``TEST.FINAL_MODEL = last_step``).  Precision follows the method's ``PREC``
(``benchmark.precision``).  The model of a run comes from ``benchmark.models``, its
batches from ``benchmark.loaders`` (where each evaluation's data path is decided once),
its record from ``benchmark.records``, the seconds of each of its stages (``timings.stages``)
from ``benchmark.stages``.
"""

from __future__ import annotations

from benchmark import stages

stages.import_begin()  # the imports a run needs that this process has not loaded yet (stages.py)
import functools  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmark import feature_cache, records, speed  # noqa: E402
from benchmark import predictions as per_image  # noqa: E402
from benchmark.backbone import clip_copy, resolve_device  # noqa: E402
from benchmark.loaders import (  # noqa: E402
    EvalInputs, eval_inputs, image_batches, image_loader, test_loader, train_loader)
from benchmark.models import dataset_context, input_size, prepare_model  # noqa: E402
from benchmark.precision import autocast, grad_scaler, optimizer_step  # noqa: E402
from benchmark.protocols import RunSpec, config_node  # noqa: E402
from benchmark.workers import worker_count  # noqa: E402
from datasets.base import Datum, generate_fewshot  # noqa: E402
from datasets.build import build_dataset  # noqa: E402
from datasets.worlds import world_of  # noqa: E402
from methods.registry import ClassesNotSupported, Method, TrainingError, get_method  # noqa: E402

stages.import_end()
log = logging.getLogger(__name__)


def out_of_memory(exc: BaseException, cfg, stage: str, n_classes: int, precision: str) -> TrainingError:
    """A clear error for a GPU out-of-memory during ``stage`` (training or evaluation)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if stage == "training":
        batch = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
        hint = (f"Use a GPU with more memory, or lower the batch size with --opts DATALOADER.TRAIN_X.BATCH_SIZE "
                f"{max(1, batch // 2)} (a change to the official recipe: the numbers will differ).")
    else:
        batch = speed.eval_batch_size(cfg)
        hint = (f"Lower the evaluation batch with --opts SPEED.EVAL_BATCH_SIZE {max(1, batch // 2)} "
                f"(accuracies do not depend on it).")
    return TrainingError(f"Out of GPU memory during {stage} (batch size {batch}, {n_classes} classes, precision "
                         f"{precision}): {first}. {hint} Finished runs are kept; rerun the command to retry.",
                         kind="out_of_memory", stage=stage, batch_size=batch, n_classes=n_classes)


# What a run reports while it runs: ``progress(stage, done, total, text)`` with stage
# "train" (optimiser steps) or "eval" (images); the caller passes it down (the command
# line's live display for sweeps in its own process).
Progress = Callable[[str, int, int, str], None]


# -- seeding -----------------------------------------------------------------------------
def set_random_seed(seed: int) -> None:
    """As the reference toolbox: random, numpy, torch (and every CUDA device), in order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# -- optimiser and schedule ------------------------------------------------------------------
def build_optimizer(params: list[torch.nn.Parameter], cfg, eps: float | None = None) -> torch.optim.Optimizer:
    """``eps``: Adam's epsilon where a method sets its own (``TRAINER.<NODE>.ADAM_EPS``; TCP)."""
    o = cfg.OPTIM
    name = str(o.NAME).lower()
    adam = {} if eps is None else {"eps": float(eps)}
    if name == "sgd":
        return torch.optim.SGD(params, lr=o.LR, momentum=o.MOMENTUM, weight_decay=o.WEIGHT_DECAY,
                               dampening=o.SGD_DAMPNING, nesterov=o.SGD_NESTEROV)
    if name == "adam":
        return torch.optim.Adam(params, lr=o.LR, weight_decay=o.WEIGHT_DECAY,
                                betas=(o.ADAM_BETA1, o.ADAM_BETA2), **adam)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o.LR, weight_decay=o.WEIGHT_DECAY,
                                 betas=(o.ADAM_BETA1, o.ADAM_BETA2), **adam)
    raise ValueError(f"OPTIM.NAME '{o.NAME}' is not supported; use sgd, adam or adamw.")


def epoch_learning_rates(cfg) -> list[float]:
    """The learning rate of each epoch, as the reference schedulers produce it.

    The schedule steps once per epoch, after the epoch's last batch.  With a warm-up of W
    epochs the wrapper returns its own rate while its epoch counter is below W; from then
    on it hands back the successor's rate and advances only the successor (so the cosine
    starts at its t = 0 on epoch W).  torch's recursive cosine is used for the successor
    so that the values are bit-identical to the reference.
    """
    o = cfg.OPTIM
    epochs = int(o.MAX_EPOCH)
    if epochs <= 0:
        return []
    name = str(o.LR_SCHEDULER).lower()
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.LR)
    if name == "cosine":
        successor = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, T_max=float(epochs))
    elif name == "single_step":
        step = o.STEPSIZE[0] if isinstance(o.STEPSIZE, (list, tuple)) else o.STEPSIZE
        successor = torch.optim.lr_scheduler.StepLR(dummy, step_size=max(int(step), 1) if int(step) > 0 else epochs,
                                                    gamma=o.GAMMA)
    elif name == "multi_step":
        successor = torch.optim.lr_scheduler.MultiStepLR(dummy, milestones=list(o.STEPSIZE), gamma=o.GAMMA)
    else:
        raise ValueError(f"OPTIM.LR_SCHEDULER '{o.LR_SCHEDULER}' is not supported; use cosine, "
                         f"single_step or multi_step.")
    warmup = int(o.WARMUP_EPOCH)
    if warmup <= 0:
        lrs = []
        for _ in range(epochs):
            lrs.append(dummy.param_groups[0]["lr"])
            dummy.step()  # a no-op (no gradients); keeps torch's step-order check quiet
            successor.step()
        return lrs
    kind = str(o.WARMUP_TYPE).lower()
    if kind not in ("constant", "linear"):
        raise ValueError(f"OPTIM.WARMUP_TYPE '{o.WARMUP_TYPE}' must be constant or linear.")
    if not o.WARMUP_RECOUNT:
        successor.last_epoch = warmup

    def warm_lr(epoch: int) -> float:
        if epoch >= warmup:
            return successor.get_last_lr()[0]
        if kind == "constant":
            return float(o.WARMUP_CONS_LR)
        return float(o.WARMUP_MIN_LR) if epoch == 0 else float(o.LR) * epoch / warmup

    lrs, counter, current = [], 0, warm_lr(0)
    for _ in range(epochs):
        lrs.append(current)
        if counter >= warmup:
            dummy.step()
            successor.step()
            current = successor.get_last_lr()[0]
        else:
            counter += 1
            current = warm_lr(counter)
    return lrs


# -- training and evaluation -----------------------------------------------------------------
@dataclass
class TrainResult:
    epoch_losses: list[float]
    learning_rates: list[float]
    steps: int
    seconds: float
    fit: dict | None = None  # what a method's own ``fit`` reports (chosen hyper-parameters, ...)


@dataclass
class FitContext:
    """What a method with its own ``fit`` (training-free, closed-form or its own loop) gets:
    the few-shot train and validation lists, the resolved config, device and precision,
    and loaders built exactly as the trainer builds them."""

    train: list[Datum]
    val: list[Datum]
    cfg: object
    device: torch.device
    precision: str
    backbone_id: str | None = None
    seed: int = 1
    # every training image of the run's classes before the few-shot draw (read on demand)
    full_train: Callable[[], Sequence[Datum]] | None = None

    def held_out_train(self, per_class: int) -> list[Datum]:
        """``per_class`` images of each class drawn, as the few-shot sampler draws with the
        run's seed, from the training images outside the few-shot set (a validation set
        for a dataset whose val is its test set)."""
        if self.full_train is None:
            return []
        used = {d.impath for d in self.train}
        pool = [d for d in self.full_train() if d.impath not in used]
        return generate_fewshot(pool, per_class, random.Random(int(self.seed)))

    def train_loader(self, data: Sequence[Datum] | None = None) -> DataLoader:
        """Shuffled, augmented (the config's train transforms), ``TRAIN_X.BATCH_SIZE``."""
        return train_loader(self.train if data is None else data, self.cfg, self.device)

    def test_loader(self, data: Sequence[Datum]) -> DataLoader:
        """In order, test transform, ``TEST.BATCH_SIZE``."""
        return test_loader(data, self.cfg, self.device)

    def loader(self, data: Sequence[Datum], *, augment: bool, batch_size: int, shuffle: bool) -> DataLoader:
        """Any other batching of ``data`` (a method's own loop), with the harness's loader
        settings: the train transforms when ``augment``, else the test transform."""
        return image_loader(data, self.cfg, self.device, augment=augment, batch_size=batch_size, shuffle=shuffle)

    def autocast(self, training: bool = False):
        return autocast(self.device, self.precision, training)

    def frozen_features(self, model: Method, data: Sequence[Datum]) -> torch.Tensor:
        """``model.image_features`` of the test-transformed images of ``data`` (no
        augmentation), in order, under evaluation precision; shared through the feature
        cache when the method's image tower is frozen (``frozen_image_features``)."""
        return image_features(model, data, eval_inputs(model, self.cfg, self.device, self.backbone_id),
                              self.precision)


def train(model: Method, data: Sequence[Datum], cfg, device: torch.device, precision: str,
          on_step: Callable[[int, int, float], None] | None = None, progress: Progress | None = None,
          timer: stages.StageTimer | None = None) -> TrainResult:
    """The training epochs; ``timer`` hears the time spent waiting for batches (``data_loading``)."""
    start = time.perf_counter()
    params = model.trainable_parameters()
    lrs = epoch_learning_rates(cfg)
    if not params or not lrs:
        return TrainResult([], [], 0, 0.0)
    timer = timer or stages.StageTimer()
    with timer("data_loading"):
        loader = train_loader(data, cfg, device)
    optimizer = build_optimizer(params, cfg, eps=model.options.get("ADAM_EPS"))
    scaler = grad_scaler(precision)
    epoch_losses, steps, last_finite = [], 0, None
    total_steps = len(lrs) * len(loader)
    for epoch, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total, count = 0.0, 0
        for batch, (images, labels) in enumerate(timer.batches(loader)):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, precision, training=True):
                logits = model(images)
                loss = model.loss(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingError(f"Loss is {loss.item()} at epoch {epoch + 1}, step {batch + 1}; "
                                    f"last finite loss: {last_finite}. Lower OPTIM.LR or use PREC fp32.",
                                    kind="non_finite_loss", epoch=epoch + 1, step=batch + 1,
                                    loss=str(loss.item()), last_finite_loss=last_finite)
            optimizer_step(loss, optimizer, scaler)
            last_finite = loss.item()
            total += last_finite
            count += 1
            steps += 1
            if on_step is not None:
                on_step(epoch, batch, last_finite)
            if progress is not None:
                progress("train", steps, total_steps, f"epoch {epoch + 1}/{len(lrs)} loss {last_finite:.4f}")
        epoch_losses.append(total / max(count, 1))
        log.info("epoch %d/%d lr %.4e loss %.4f", epoch + 1, len(lrs), lr, epoch_losses[-1])
        model.on_epoch_end(epoch, len(lrs))
    model.on_train_end()
    return TrainResult(epoch_losses, lrs, steps, time.perf_counter() - start)


def classification_metrics(labels: np.ndarray, preds: np.ndarray) -> dict:
    """Accuracy and macro-F1 in percent, macro over the labels present in ``labels``."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    n = len(labels)
    correct = int((labels == preds).sum())
    f1s = []
    for c in np.unique(labels):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": 100.0 * correct / n if n else float("nan"),
        "macro_f1": 100.0 * float(np.mean(f1s)) if f1s else float("nan"),
        "n_images": n,
        "n_correct": correct,
    }


@torch.no_grad()
def image_features(model: Method, data: Sequence[Datum], inputs: EvalInputs, precision: str) -> torch.Tensor:
    """``model.image_features`` of every test-transformed image of ``data``, in order, from
    the feature cache on the ``features`` path."""
    model.eval()
    evaluation = functools.partial(autocast, inputs.device, precision, training=False)
    if inputs.path == "features":
        key = feature_cache.feature_key(data, inputs.cfg, backbone_id=inputs.backbone_id, weight_dtype=model.dtype,
                                        precision=precision, device=inputs.device)
        return feature_cache.frozen_features(model.image_features, data, inputs.cache_dir, key=key,
                                             batches=lambda: image_batches(inputs, data), device=inputs.device,
                                             autocast=evaluation)
    parts = []
    for images in image_batches(inputs, data):
        with evaluation():
            parts.append(model.image_features(images))
    return torch.cat(parts)


@torch.no_grad()
def batch_logits(model: Method, data: Sequence[Datum], inputs: EvalInputs, precision: str) -> Iterator[torch.Tensor]:
    """The model's logits on ``data``, batch by batch, in order.  On the ``features`` path
    the method runs only its head on cached features; otherwise ``model(images)`` on the
    images of the path (decoded-image cache or files: the plain loop)."""
    model.eval()
    if inputs.path == "features":
        features = image_features(model, data, inputs, precision)
        for chunk in features.split(inputs.batch_size):
            with autocast(inputs.device, precision, training=False):
                yield model.logits_from_features(chunk)
        return
    for images in image_batches(inputs, data):
        with autocast(inputs.device, precision, training=False):
            yield model(images)


def predict(model: Method, data: Sequence[Datum], inputs: EvalInputs, precision: str,
            progress: Progress | None = None) -> np.ndarray:
    preds, done = [], 0
    for logits in batch_logits(model, data, inputs, precision):
        preds.append(logits.argmax(dim=-1).cpu())
        done += len(logits)
        if progress is not None:
            progress("eval", done, len(data), f"{len(model.classnames)} classes")
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def evaluate(model: Method, data: Sequence[Datum], inputs: EvalInputs, precision: str,
             progress: Progress | None = None, keep: dict | None = None) -> dict:
    """Accuracy, macro-F1 and counts of ``model`` on ``data`` (``inputs``: ``eval_inputs``);
    ``keep`` (a dict) receives the per-image predictions as ``preds``."""
    start = time.perf_counter()
    preds = predict(model, data, inputs, precision, progress)
    metrics = classification_metrics(np.array([d.label for d in data]), preds)
    metrics["seconds"] = time.perf_counter() - start
    if keep is not None:
        keep["preds"] = preds
    return metrics


def execute(spec: RunSpec, device: str | torch.device | None = None,
            on_step: Callable[[int, int, float], None] | None = None, *,
            previous: dict | None = None, checkpoint: str | Path | None = None,
            save_checkpoint: bool = False, progress: Progress | None = None,
            output: str | Path | None = None) -> records.FinishedRecord:
    """Train and evaluate one run spec; returns its record (status "ok").

    ``previous``: this spec's earlier successful record that lacks some evaluations; with
    its ``checkpoint`` on disk the weights are restored instead of trained, only the
    missing evaluations run, and the record keeps the earlier ones.  ``save_checkpoint``
    writes the learned weights to ``checkpoint`` after training.  With ``output`` (the results
    folder) the per-image predictions go to ``<output>/predictions/`` (``benchmark.predictions``)."""
    from benchmark import checkpoint as ckpt

    started = time.time()
    t0 = time.perf_counter()
    timer = stages.StageTimer()
    cfg = config_node(spec)
    device = resolve_device(device)
    info = get_method(spec.method)
    root = cfg.DATASET.ROOT
    world = world_of(root)

    set_random_seed(spec.seed)
    with timer("datasets"):
        train_set = build_dataset(spec.dataset, root, num_shots=spec.shots, seed=spec.seed,
                                  subsample=spec.subsample)
    short = short_classes(train_set.train, train_set.classnames, spec.shots)
    if short:
        # the reference sampler keeps every image of such a class (no repetition): so do we
        log.warning("%s: %d classes have fewer than %d training images (e.g. %s); all their images are used, "
                    "as the reference sampler does.", spec.label, len(short), spec.shots, ", ".join(list(short)[:3]))
    model_start = time.perf_counter()
    clip = clip_copy(spec.backbone)
    if tuple(cfg.INPUT.SIZE) != input_size(clip):
        # the official trainers assert this; the backbone decides the input size
        cfg.defrost()
        cfg.INPUT.SIZE = input_size(clip)
        cfg.freeze()
    # loading a backbone may draw from torch's RNG (or not, when cached): re-seed so that a
    # run's initialisation and batches depend on its seed only
    torch.manual_seed(spec.seed)
    told = dataset_context(train_set.name, train_set.classnames, world=world, shots=spec.shots,
                           all_classnames=train_set.all_classnames)
    model, requested, precision = prepare_model(spec.method, cfg, told, device=device, clip=clip)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    resumed = previous is not None and checkpoint is not None and Path(checkpoint).is_file()
    if resumed:
        ckpt.load(model, checkpoint)
        if not _same_learned(ckpt.summary(model), previous.get("learned")):
            log.warning("%s: the checkpoint %s does not hold the weights its record was made with (damaged or "
                        "replaced); training again.", spec.label, checkpoint)
            resumed, previous = False, None
            del model
            clip = clip_copy(spec.backbone)
            torch.manual_seed(spec.seed)  # built again exactly as above
            model, requested, precision = prepare_model(spec.method, cfg, told, device=device, clip=clip)
    timer.add("model", time.perf_counter() - model_start)
    train_start, waited = time.perf_counter(), timer.seconds["data_loading"]
    if resumed:
        result = None
        log.info("%s: weights restored from %s; evaluating the missing targets only", spec.label, checkpoint)
    else:
        try:
            if model.fit is not None:
                def full_train() -> list[Datum]:  # for a held-out validation set (ImageNet's val is its test)
                    return build_dataset(spec.dataset, root, seed=spec.seed, subsample=spec.subsample).train

                fit_start = time.perf_counter()
                report = model.fit(FitContext(train_set.train, train_set.val, cfg, device, precision,
                                              spec.backbone_id, seed=spec.seed, full_train=full_train)) or {}
                # a method with its own loop reports its steps, losses and learned parameters
                result = TrainResult(list(report.get("epoch_losses", [])), list(report.get("learning_rates", [])),
                                     int(report.get("steps", 0)), time.perf_counter() - fit_start,
                                     fit=report or None)
                n_trainable = int(report.get("trainable_params", n_trainable))
            else:
                result = train(model, train_set.train, cfg, device, precision, on_step=on_step, progress=progress,
                               timer=timer)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, cfg, "training", len(train_set.classnames), precision) from exc
    timer.add("training", time.perf_counter() - train_start - (timer.seconds["data_loading"] - waited))
    learned = ckpt.summary(model)  # what was learned, before any evaluation (``verify`` compares it)
    if save_checkpoint and not resumed and checkpoint is not None:
        with timer("writing"):
            ckpt.save(model, checkpoint, run_id=spec.run_id)

    eval_start, built = time.perf_counter(), timer.seconds["datasets"]
    metrics = dict(previous["metrics"]) if resumed else {}
    kept: dict[str, per_image.Predictions] = {}
    inputs = eval_inputs(model, cfg, device, spec.backbone_id)  # the evaluations' data path, decided once
    for ev in spec.evals:
        if ev.name in metrics:
            continue
        if ev.dataset == spec.dataset and ev.subsample == spec.subsample:
            target = train_set
        else:
            with timer("datasets"):
                target = build_dataset(ev.dataset, root, num_shots=spec.shots if ev.dataset == spec.dataset else 0,
                                       seed=spec.seed, subsample=ev.subsample)
        data, names = target.test, target.classnames
        # the method is told what it classifies now: each target with its own template
        now = dataset_context(target.name, names, world=world, shots=spec.shots,
                              all_classnames=target.all_classnames)
        if now != model.dataset or names != model.classnames:
            try:
                model.use_dataset(now)
            except ClassesNotSupported as exc:  # e.g. a linear probe on classes it never saw
                metrics[ev.name] = records.not_applicable(str(exc), len(names))
                log.info("%s %s: not applicable (%s)", spec.label, ev.name, exc)
                continue
        try:
            keep: dict = {}
            metrics[ev.name] = evaluate(model, data, inputs, precision, progress, keep)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, cfg, "evaluation", len(names), precision) from exc
        kept[ev.name] = per_image.Predictions.of(data, keep["preds"], root)
        metrics[ev.name]["n_classes"] = len(names)
        log.info("%s %s: accuracy %.2f", spec.label, ev.name, metrics[ev.name]["accuracy"])

    timer.add("evaluation", time.perf_counter() - eval_start - (timer.seconds["datasets"] - built))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if resumed:
        train_info, train_s = previous["train"], previous["timings"]["train_s"]
    else:
        train_info = records.TrainInfo(
            n_images=len(train_set.train), n_classes=len(train_set.classnames), classes_short_of_shots=short,
            classes_without_training_images=train_set.classes_without_training_images, steps=result.steps,
            epoch_losses=result.epoch_losses, learning_rates=result.learning_rates, fit=result.fit)
        train_s = result.seconds
    evals = [e.__dict__ for e in spec.evals]
    with timer("writing"):
        stored = per_image.relative_path(spec) if output is not None else None
        if stored is not None and (kept or Path(output, stored).is_file()):
            per_image.write(Path(output) / stored, kept)  # added to an earlier file of the run
        else:
            stored = None
        software, revision = records.software_versions(), records.code_revision()
    total_s = time.perf_counter() - t0
    return records.finished(
        spec, method_version=info.version, world=world,
        evals=records.merge_evals(previous.get("evals", []), evals) if resumed else evals,
        metrics=metrics, train=train_info,
        compute={"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                 "precision_requested": requested, "precision": precision, "trainable_params": n_trainable,
                 "peak_memory_bytes": peak},
        timings={"train_s": train_s, "total_s": total_s, "started": started, "finished": time.time(),
                 "stages": timer.finish(total_s, stages.take_imports())},
        effective_input_size=list(cfg.INPUT.SIZE), software=software, code_revision=revision,
        checkpoint=str(checkpoint) if checkpoint is not None and Path(checkpoint).is_file() else None,
        resumed_from_checkpoint=resumed, predictions=stored,
        environment=_environment(previous if resumed else None, device, cfg), learned=learned)


def _same_learned(now: dict, recorded: dict | None) -> bool:
    """Whether restored weights are those a record summarised (``checkpoint.summary``): the
    same tensors, bit for bit.  A record made before summaries existed cannot tell: yes."""
    if not isinstance(recorded, dict):
        return True
    return set(now) == set(recorded) and all(now[k]["sha256"] == recorded[k].get("sha256") for k in now)


def _environment(previous: dict | None, device: torch.device, cfg) -> dict:
    """The record's environment: this process's; for a run restored from its checkpoint,
    the training's (from the earlier record), with this one under ``later_evaluations``."""
    now = records.environment(device, worker_count(cfg))
    if previous is None or not isinstance(previous.get("environment"), dict):
        return now
    return {**previous["environment"], "later_evaluations": now}


def short_classes(train: Sequence[Datum], classnames: Sequence[str], shots: int) -> dict[str, int]:
    """Classes with fewer than ``shots`` training images: name -> images."""
    if shots < 1:
        return {}
    counts = np.bincount([d.label for d in train], minlength=len(classnames))
    return {classnames[i]: int(n) for i, n in enumerate(counts) if n < shots}
