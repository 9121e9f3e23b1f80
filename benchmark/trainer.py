"""One run: data, model, optimiser, epochs, evaluation -> a record.

Reproduces the reference toolbox's training semantics (see DATA_LAYOUT in the project
docs): seeding of ``random``, numpy and torch in that order before the data is built;
few-shot sampling from the dataset code; a RandomSampler loader that drops the last
incomplete batch when there is at least one full batch; SGD (or Adam) over the method's
trainable parameters; a learning rate that changes once per epoch, after the epoch's
last step (cosine with the constant/linear warm-up wrappers); the last-epoch model is
evaluated (``TEST.FINAL_MODEL = last_step``).  Precision follows the method's ``PREC``:
fp32, fp16 (CLIP and the learned weights in half precision), amp (fp32 weights,
autocast + GradScaler for training, evaluation in fp32) or bf16 (autocast); on a CPU
every mode falls back to fp32.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from benchmark import speed
from benchmark.backbone import clip_info, load_clip, resolve_device
from benchmark.protocols import RunSpec, config_node
from benchmark.transforms import build_test_transform, build_train_transform
from datasets.base import Datum, build_dataset
from datasets.toy import world_of
from methods.registry import ClassesNotSupported, Method, build_method, get_method

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); its message and ``details``
    (what failed, where) are stored in the run's failure record."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


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


# -- progress ---------------------------------------------------------------------------
# Where a run in this process reports its progress: ``fn(stage, done, total, text)`` with
# stage "train" (steps) or "eval" (images).  The command line's live display sets it for
# sweeps that run in this process; nothing is reported otherwise.
_progress: Callable[[str, int, int, str], None] | None = None


def set_progress(fn: Callable[[str, int, int, str], None] | None) -> None:
    global _progress
    _progress = fn


def _report(stage: str, done: int, total: int, text: str = "") -> None:
    if _progress is not None:
        _progress(stage, done, total, text)


# -- seeding -----------------------------------------------------------------------------
def set_random_seed(seed: int) -> None:
    """As the reference toolbox: random, numpy, torch (and every CUDA device), in order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# -- data ----------------------------------------------------------------------------------
class ImageList(Dataset):
    """Images of a list of Datum through a transform -> (image tensor, label)."""

    def __init__(self, data: Sequence[Datum], transform: Callable):
        self.data = list(data)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item = self.data[index]
        try:
            with Image.open(item.impath) as img:
                image = img.convert("RGB")
        except (OSError, SyntaxError) as exc:
            raise OSError(f"Cannot read image {item.impath} (class '{item.classname}'): {exc}. "
                          f"Check the file or re-extract the dataset.") from exc
        return self.transform(image), item.label


def _workers(cfg, device: torch.device) -> int:
    return max(0, min(int(cfg.DATALOADER.NUM_WORKERS), os.cpu_count() or 1))


def train_loader(data: Sequence[Datum], cfg, device: torch.device) -> DataLoader:
    batch = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
    dataset = ImageList(data, build_train_transform(cfg))
    return DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset),
                      num_workers=_workers(cfg, device), drop_last=len(dataset) >= batch,
                      pin_memory=device.type == "cuda")


def test_loader(data: Sequence[Datum], cfg, device: torch.device, batch_size: int | None = None) -> DataLoader:
    dataset = ImageList(data, build_test_transform(cfg))
    return DataLoader(dataset, batch_size=batch_size or int(cfg.DATALOADER.TEST.BATCH_SIZE),
                      sampler=SequentialSampler(dataset), num_workers=_workers(cfg, device),
                      drop_last=False, pin_memory=device.type == "cuda")


# -- optimiser and schedule ------------------------------------------------------------------
def build_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    o = cfg.OPTIM
    name = str(o.NAME).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=o.LR, momentum=o.MOMENTUM, weight_decay=o.WEIGHT_DECAY,
                               dampening=o.SGD_DAMPNING, nesterov=o.SGD_NESTEROV)
    if name == "adam":
        return torch.optim.Adam(params, lr=o.LR, weight_decay=o.WEIGHT_DECAY,
                                betas=(o.ADAM_BETA1, o.ADAM_BETA2))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o.LR, weight_decay=o.WEIGHT_DECAY,
                                 betas=(o.ADAM_BETA1, o.ADAM_BETA2))
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


# -- precision --------------------------------------------------------------------------------
def effective_precision(requested: str, device: torch.device) -> str:
    if requested not in ("fp32", "fp16", "amp", "bf16"):
        raise ValueError(f"PREC '{requested}' is not one of fp32, fp16, amp, bf16.")
    if device.type != "cuda":
        return "fp32"  # CPU fallback, as the issue asks; the record stores both
    return requested


def cast_clip(clip: torch.nn.Module, precision: str) -> torch.nn.Module:
    """fp16: the released CLIP's half-precision layout (linear/conv/attention weights and
    the projections in fp16, layer norms and embeddings in fp32)."""
    if precision == "fp16":
        from open_clip.model import convert_weights_to_lp
        from open_clip.transformer import LayerNorm, LayerNormFp32

        convert_weights_to_lp(clip, dtype=torch.float16)
        for module in clip.modules():
            if type(module) is LayerNorm:
                # the released model's layer norms compute in fp32 and cast back
                module.__class__ = LayerNormFp32
    return clip


def _autocast(device: torch.device, precision: str, training: bool):
    if device.type == "cuda" and precision == "amp" and training:
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


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

    def train_loader(self, data: Sequence[Datum] | None = None) -> DataLoader:
        """Shuffled, augmented (the config's train transforms), ``TRAIN_X.BATCH_SIZE``."""
        return train_loader(self.train if data is None else data, self.cfg, self.device)

    def test_loader(self, data: Sequence[Datum]) -> DataLoader:
        """In order, test transform, ``TEST.BATCH_SIZE``."""
        return test_loader(data, self.cfg, self.device)

    def autocast(self, training: bool = False):
        return _autocast(self.device, self.precision, training)

    def frozen_features(self, model: Method, data: Sequence[Datum]) -> torch.Tensor:
        """``model.image_features`` of the test-transformed images of ``data`` (no
        augmentation), in order, under evaluation precision; shared through the feature
        cache when the method's image tower is frozen (``frozen_image_features``)."""
        return image_features(model, data, self.cfg, self.device, self.precision, self.backbone_id)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward and one update, through the GradScaler under amp (as the reference trainers)."""
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train(model: Method, data: Sequence[Datum], cfg, device: torch.device, precision: str,
          on_step: Callable[[int, int, float], None] | None = None) -> TrainResult:
    params = model.trainable_parameters()
    lrs = epoch_learning_rates(cfg)
    start = time.perf_counter()
    if not params or not lrs:
        return TrainResult([], [], 0, 0.0)
    loader = train_loader(data, cfg, device)
    optimizer = build_optimizer(params, cfg)
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" else None
    epoch_losses, steps, last_finite = [], 0, None
    total_steps = len(lrs) * len(loader)
    for epoch, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total, count = 0.0, 0
        for batch, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with _autocast(device, precision, training=True):
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
            _report("train", steps, total_steps, f"epoch {epoch + 1}/{len(lrs)} loss {last_finite:.4f}")
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


def _uses_feature_cache(model: Method, cfg, backbone_id: str | None) -> bool:
    return (bool(model.frozen_image_features) and backbone_id is not None
            and speed.cache_dir(cfg) is not None and speed.enabled(cfg, "FEATURE_CACHE"))


@torch.no_grad()
def image_features(model: Method, data: Sequence[Datum], cfg, device: torch.device, precision: str,
                   backbone_id: str | None = None) -> torch.Tensor:
    """``model.image_features`` of every test-transformed image of ``data``, in order."""
    from benchmark import feature_cache

    batch = speed.eval_batch_size(cfg)
    model.eval()
    if _uses_feature_cache(model, cfg, backbone_id):
        key = feature_cache.feature_key(data, cfg, backbone_id=backbone_id, weight_dtype=model.dtype,
                                        precision=precision, device=device)
        return feature_cache.frozen_features(model.image_features, data, cfg, device, key=key, batch_size=batch,
                                             autocast=lambda: _autocast(device, precision, training=False))
    parts = []
    for images in feature_cache.image_batches(data, cfg, device, batch):
        with _autocast(device, precision, training=False):
            parts.append(model.image_features(images))
    return torch.cat(parts)


@torch.no_grad()
def batch_logits(model: Method, data: Sequence[Datum], cfg, device: torch.device, precision: str,
                 backbone_id: str | None = None) -> Iterator[torch.Tensor]:
    """The model's logits on ``data``, batch by batch, in order.

    Fast paths (``benchmark.speed``): a method whose image tower is frozen gets its test
    features from the feature cache and runs only its head on them; the others get their
    images from the decoded-image cache.  With every fast path off this is the plain
    loop: the test loader, then ``model(images)``."""
    from benchmark import feature_cache

    model.eval()
    batch = speed.eval_batch_size(cfg)
    if _uses_feature_cache(model, cfg, backbone_id):
        features = image_features(model, data, cfg, device, precision, backbone_id)
        for chunk in features.split(batch):
            with _autocast(device, precision, training=False):
                yield model.logits_from_features(chunk)
        return
    for images in feature_cache.image_batches(data, cfg, device, batch):
        with _autocast(device, precision, training=False):
            yield model(images)


def predict(model: Method, data: Sequence[Datum], cfg, device: torch.device, precision: str,
            backbone_id: str | None = None) -> np.ndarray:
    preds, done = [], 0
    for logits in batch_logits(model, data, cfg, device, precision, backbone_id):
        preds.append(logits.argmax(dim=-1).cpu())
        done += len(logits)
        _report("eval", done, len(data), f"{len(model.classnames)} classes")
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def evaluate(model: Method, data: Sequence[Datum], cfg, device: torch.device, precision: str,
             backbone_id: str | None = None) -> dict:
    start = time.perf_counter()
    preds = predict(model, data, cfg, device, precision, backbone_id)
    metrics = classification_metrics(np.array([d.label for d in data]), preds)
    metrics["seconds"] = time.perf_counter() - start
    return metrics


# -- one run ----------------------------------------------------------------------------------
_CLIP_CACHE: dict[str, torch.nn.Module] = {}


def _clip_copy(backbone: str) -> torch.nn.Module:
    """A private fp32 CPU copy of the backbone (loaded once per process)."""
    if backbone not in _CLIP_CACHE:
        _CLIP_CACHE.clear()  # keep at most one backbone in memory
        _CLIP_CACHE[backbone] = load_clip(backbone, "cpu")
    return copy.deepcopy(_CLIP_CACHE[backbone])


def software_versions() -> dict:
    import open_clip
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__}


def code_revision() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def execute(spec: RunSpec, device: str | torch.device | None = None,
            on_step: Callable[[int, int, float], None] | None = None, *,
            previous: dict | None = None, checkpoint: str | Path | None = None,
            save_checkpoint: bool = False) -> dict:
    """Train and evaluate one run spec; returns its record (status "ok").

    ``previous``: this spec's earlier successful record that lacks some evaluations; with
    its ``checkpoint`` on disk the weights are restored instead of trained, only the
    missing evaluations run, and the record keeps the earlier ones.  ``save_checkpoint``
    writes the learned weights to ``checkpoint`` after training."""
    from benchmark import checkpoint as ckpt

    started = time.time()
    t0 = time.perf_counter()
    cfg = config_node(spec)
    device = resolve_device(device)
    info = get_method(spec.method)
    root = cfg.DATASET.ROOT

    set_random_seed(spec.seed)
    train_set = build_dataset(spec.dataset, root, num_shots=spec.shots, seed=spec.seed,
                              subsample=spec.subsample)
    short = short_classes(train_set.train, train_set.classnames, spec.shots)
    if short:
        # the reference sampler keeps every image of such a class (no repetition): so do we
        log.warning("%s: %d classes have fewer than %d training images (e.g. %s); all their images are used, "
                    "as the reference sampler does.", spec.label, len(short), spec.shots, ", ".join(list(short)[:3]))
    clip = _clip_copy(spec.backbone)
    image_size = clip_info(clip)["image_size"]
    if tuple(cfg.INPUT.SIZE) != (image_size, image_size):
        # the official trainers assert this; the backbone decides the input size
        cfg.defrost()
        cfg.INPUT.SIZE = (image_size, image_size)
        cfg.freeze()
    # loading a backbone may draw from torch's RNG (or not, when cached): re-seed so that a
    # run's initialisation and batches depend on its seed only
    torch.manual_seed(spec.seed)
    requested = str(cfg.TRAINER[info.node].get("PREC", "fp32"))
    precision = effective_precision(requested, device)
    clip = cast_clip(clip, precision)
    model = build_method(spec.method, clip, train_set.classnames, cfg).to(device)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    resumed = previous is not None and checkpoint is not None and Path(checkpoint).is_file()
    if resumed:
        ckpt.load(model, checkpoint)
        result = None
        log.info("%s: weights restored from %s; evaluating the missing targets only", spec.label, checkpoint)
    else:
        try:
            if model.fit is not None:
                fit_start = time.perf_counter()
                report = model.fit(FitContext(train_set.train, train_set.val, cfg, device, precision,
                                              spec.backbone_id)) or {}
                # a method with its own loop reports its steps, losses and learned parameters
                result = TrainResult(list(report.get("epoch_losses", [])), list(report.get("learning_rates", [])),
                                     int(report.get("steps", 0)), time.perf_counter() - fit_start,
                                     fit=report or None)
                n_trainable = int(report.get("trainable_params", n_trainable))
            else:
                result = train(model, train_set.train, cfg, device, precision, on_step=on_step)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, cfg, "training", len(train_set.classnames), precision) from exc
    if save_checkpoint and not resumed and checkpoint is not None:
        ckpt.save(model, checkpoint, run_id=spec.run_id)

    metrics = dict(previous["metrics"]) if resumed else {}
    for ev in spec.evals:
        if ev.name in metrics:
            continue
        if ev.dataset == spec.dataset and ev.subsample == spec.subsample:
            data, names = train_set.test, train_set.classnames
        else:
            other = build_dataset(ev.dataset, root, num_shots=spec.shots if ev.dataset == spec.dataset else 0,
                                  seed=spec.seed, subsample=ev.subsample)
            data, names = other.test, other.classnames
        if names != model.classnames:
            try:
                model.set_classnames(names)
            except ClassesNotSupported as exc:  # e.g. a linear probe on classes it never saw
                metrics[ev.name] = {"status": "not_applicable", "reason": str(exc), "n_classes": len(names)}
                log.info("%s %s: not applicable (%s)", spec.label, ev.name, exc)
                continue
        try:
            metrics[ev.name] = evaluate(model, data, cfg, device, precision, spec.backbone_id)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, cfg, "evaluation", len(names), precision) from exc
        metrics[ev.name]["n_classes"] = len(names)
        log.info("%s %s: accuracy %.2f", spec.label, ev.name, metrics[ev.name]["accuracy"])

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if resumed:
        train_info, train_s = previous["train"], previous["timings"]["train_s"]
    else:
        train_info = {
            "n_images": len(train_set.train),
            "classes_short_of_shots": short,
            "n_classes": len(train_set.classnames),
            "steps": result.steps,
            "epoch_losses": result.epoch_losses,
            "learning_rates": result.learning_rates,
            "fit": result.fit,
        }
        train_s = result.seconds
    record = {
        "id": spec.run_id,
        "status": "ok",
        "method": spec.method,
        "method_version": info.version,
        "protocol": spec.protocol,
        "stage": spec.stage,
        "dataset": spec.dataset,
        "shots": spec.shots,
        "seed": spec.seed,
        "subsample": spec.subsample,
        "backbone": spec.backbone,
        "backbone_id": spec.backbone_id,
        "world": world_of(root),
        "evals": [e.__dict__ for e in spec.evals],
        "metrics": metrics,
        "train": train_info,
        "compute": {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "precision_requested": requested,
            "precision": precision,
            "trainable_params": n_trainable,
            "peak_memory_bytes": peak,
        },
        "timings": {"train_s": train_s, "total_s": time.perf_counter() - t0,
                    "started": started, "finished": time.time()},
        "config": spec.config,
        "effective_input_size": list(cfg.INPUT.SIZE),
        "software": software_versions(),
        "code_revision": code_revision(),
    }
    if checkpoint is not None and Path(checkpoint).is_file():
        record["checkpoint"] = str(checkpoint)
    if resumed:
        record["resumed_from_checkpoint"] = True
        record["evals"] = _merge_evals(previous.get("evals", []), record["evals"])
    return record


def short_classes(train: Sequence[Datum], classnames: Sequence[str], shots: int) -> dict[str, int]:
    """Classes with fewer than ``shots`` training images: name -> images."""
    if shots < 1:
        return {}
    counts = np.bincount([d.label for d in train], minlength=len(classnames))
    return {classnames[i]: int(n) for i, n in enumerate(counts) if n < shots}


def _merge_evals(old: list[dict], new: list[dict]) -> list[dict]:
    names = {e["name"] for e in new}
    return [e for e in old if e["name"] not in names] + new


def harmonic_mean(base: float, novel: float) -> float:
    if base is None or novel is None or math.isnan(base) or math.isnan(novel) or base + novel == 0:
        return float("nan")
    return 2 * base * novel / (base + novel)
