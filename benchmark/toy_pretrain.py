"""Pre-trains the toy CLIP (``model_configs/toy-clip.json``) on generated toy-world scenes.

No pretrained CLIP weights exist on the development machines and a random CLIP makes
every accuracy meaningless, so this trains a small 12-layer CLIP here, contrastively
(open_clip's ``ClipLoss``, CLIP's BPE tokenizer), on (image, caption) pairs from
:mod:`datasets.toyworld`. Held-out (shape, colour) pairs are never shown, so zero-shot
accuracy on them measures generalisation to novel compositions.

    python -m benchmark.toy_pretrain --out benchmark/weights/toy-clip.pt [--steps N] [--device cuda]

Training draws from a pool of pre-rendered scenes, each with several captions
(``--pool-size``, ``--captions-per-image``). The pool is rendered in chunks whose random
streams depend only on the seed and the chunk index, so it is the same for any number of
worker processes; batches are drawn by a seeded torch generator. A re-run with the same
arguments on the same kind of device reproduces the weights (bit for bit on CPU with the
same thread count). ``--time-budget`` picks the number of steps from the speed of the
first steps (the learning rate of the warm-up does not depend on it); the sidecar records
the chosen count, and ``--steps`` with that count repeats the run. The weights are
written in fp16 as an OpenAI-format state dict (``load_clip(path)`` reads them back), with
a sidecar JSON holding the command, settings, versions, timings, final loss and the
zero-shot report of the saved weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool

from benchmark.backbone import clip_info, load_clip, save_openai_checkpoint
from datasets import toyworld as tw

__all__ = [
    "CONFIG_NAME", "Pool", "encode_text_truncated", "load_pool", "render_pool", "save_pool", "pretrain", "zero_shot_report", "main",
]

_logger = logging.getLogger(__name__)

CONFIG_NAME = "toy-clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATE = "a photo of a {}."
CHUNK = 1024  # scenes per independently seeded pool chunk
TOKEN_WIDTH = 24  # pool captions are stored cut to this many tokens; the longest needs 17


# --------------------------------------------------------------------------- data

def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> CLIP-normalised float (N, 3, H, W), on x's device."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_tensor(images: list) -> torch.Tensor:
    """PIL images -> CLIP-normalised float batch (N, 3, H, W)."""
    return _normalise(torch.from_numpy(np.stack([np.asarray(im) for im in images])))


def _pretrain_scene(rng: np.random.Generator) -> tw.Scene:
    styles = list(tw.PRETRAIN_STYLE_SHARES)
    shares = np.array([tw.PRETRAIN_STYLE_SHARES[s] for s in styles])
    style = styles[int(np.searchsorted(np.cumsum(shares) / shares.sum(), rng.random(), side="right"))]
    return tw.sample_scene(rng, held_out_ok=False, styles=(style,))


@dataclasses.dataclass
class Pool:
    """Pre-rendered pre-training data: images (N, H, W, 3) uint8, tokens (N, K, TOKEN_WIDTH) int32."""

    images: np.ndarray
    tokens: np.ndarray


def _render_chunk(job: tuple[int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, index, count, image_size, n_captions = job
    rng = np.random.default_rng([seed, index])
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    captions = []
    for i in range(count):
        scene = _pretrain_scene(rng)
        images[i] = np.asarray(tw.render(scene, image_size, rng))
        captions.extend(tw.caption(scene, rng) for _ in range(n_captions))
    tokens = open_clip.tokenize(captions).numpy()
    if (tokens[:, TOKEN_WIDTH:] != 0).any():  # pragma: no cover - captions are short by construction
        raise ValueError(f"a pre-training caption needs more than {TOKEN_WIDTH} tokens")
    return images, tokens[:, :TOKEN_WIDTH].astype(np.int32).reshape(count, n_captions, TOKEN_WIDTH)


def render_pool(size: int, image_size: int, seed: int, *, captions_per_image: int = 8, workers: int = 1) -> Pool:
    """Renders `size` pre-training scenes with `captions_per_image` captions each.

    Chunk i of CHUNK scenes draws from ``default_rng([seed, i])``: the pool depends only
    on (size, image_size, seed, captions_per_image), not on `workers`.
    """
    jobs = [(seed, i, min(CHUNK, size - lo), image_size, captions_per_image) for i, lo in enumerate(range(0, size, CHUNK))]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs, chunksize=1)
    else:
        parts = [_render_chunk(job) for job in jobs]
    return Pool(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def save_pool(pool: Pool, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Writes the pool and the arguments that made it (``meta``) to an uncompressed .npz file."""
    np.savez(path, images=pool.images, tokens=pool.tokens, meta=json.dumps(meta, sort_keys=True))


def load_pool(path: str | os.PathLike, meta: dict[str, Any]) -> Pool | None:
    """The pool saved at path if it was made with the same ``meta``, else None."""
    if not Path(path).is_file():
        return None
    with np.load(path) as data:
        if str(data["meta"]) != json.dumps(meta, sort_keys=True):
            return None
        return Pool(data["images"], data["tokens"])


def encode_text_truncated(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut to the longest real sequence in the batch.

    The text tower is causal, so positions after the end-of-text token cannot change the
    features pooled at it: the result equals the full 77-token pass, at a fraction of the cost.
    """
    length = int((tokens != 0).sum(dim=1).max())
    return _encode_text_prefix(model, tokens[:, :length])


def _encode_text_prefix(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` of tokens given as their first columns (all end-of-text tokens inside)."""
    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    return x @ model.text_projection


# --------------------------------------------------------------------------- training

def _random_model(seed: int, config: dict[str, Any] | None = None) -> CLIP:
    """The toy architecture (or `config`) with its seeded random init.

    Built from the config directly: ``load_clip("toy-clip")`` prefers the shipped weights
    once they exist. Same init as ``load_clip`` gives a config name (a private RNG stream
    seeded with seed), so the shipped weights stay reproducible.
    """
    cfg = copy.deepcopy(config or open_clip.get_model_config(CONFIG_NAME))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**cfg, cast_dtype=None)
    return model.float()


def _param_groups(model: CLIP, weight_decay: float) -> list[dict[str, Any]]:
    # as in CLIP training: no decay on gains, biases, the temperature and embeddings
    # (the token table has ~49k rows of which the toy world uses a few hundred)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "logit_scale" in name or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def pretrain(
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 100,
    log_every: int = 10,
    overfit: bool = False,
    probe_every: int = 0,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    pool: Pool | None = None,
    pool_size: int | None = None,
    captions_per_image: int = 8,
    workers: int = 1,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
    time_budget_s: float | None = None,
    save_every: int = 0,
    on_save: Callable[[CLIP, int], None] | None = None,
) -> tuple[CLIP, list[float]]:
    """Trains the toy CLIP from its seeded random init; returns the fp32 model and per-step losses.

    pool: pre-rendered data (default: ``render_pool(pool_size or batch_size * steps)``).
    overfit repeats the first batch at every step (a quick learning check for tests);
    probe_every > 0 logs a small zero-shot shape probe at those steps (its own RNG, so the
    training stream is unchanged). time_budget_s, when given, replaces `steps` by as many
    steps as fit in that many seconds at the speed of the first steps (measured before the
    warm-up ends, so the learning rates up to then do not depend on it); len(losses) is the
    count chosen. on_save(model, step) is called every save_every steps.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = _random_model(seed, config).to(device).train()
    image_size = clip_info(model)["image_size"]
    if pool is None:
        pool = render_pool(pool_size or min(200_000, batch_size * steps), image_size, seed,
                           captions_per_image=captions_per_image, workers=workers)
    if pool.images.shape[1] != image_size:
        raise ValueError(f"The pool holds {pool.images.shape[1]} px images; the model takes {image_size} px.")
    images_all = torch.from_numpy(pool.images).to(device)
    tokens_all = torch.from_numpy(pool.tokens).to(device).long()
    generator = torch.Generator().manual_seed(seed)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    losses: list[torch.Tensor] = []
    calibrate_at = min(max(warmup, 1), 60) if time_budget_s else -1
    start = time.perf_counter()
    step = 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, lr)
        if step == 0 or not overfit:
            idx = torch.randint(len(pool.images), (batch_size,), generator=generator)
            cap = torch.randint(pool.tokens.shape[1], (batch_size,), generator=generator)
            images = _normalise(images_all[idx.to(device)])
            tokens = tokens_all[idx.to(device), cap.to(device)]
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(_encode_text_prefix(model, tokens), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.detach())
        step += 1
        if step == 5 and calibrate_at > 5:
            _sync(device)
            calibration_start = time.perf_counter()
        if step == calibrate_at and calibrate_at > 5:
            _sync(device)
            per_step = (time.perf_counter() - calibration_start) / (calibrate_at - 5)
            steps = max(calibrate_at, int((time_budget_s - (time.perf_counter() - start)) / per_step) + step)
            _logger.info("%.1f ms per step: %d steps fit in the time budget of %.0f s", per_step * 1e3, steps, time_budget_s)
        if probe_every and step % probe_every == 0:
            probe = _classify(model, image_size, list(tw.SHAPES), [{"shape": s, "style": "photo"} for s in tw.SHAPES],
                              10, np.random.default_rng([seed, 7, step - 1]))
            model.train()
            _logger.info("step %d: zero-shot shape accuracy %.1f%% (probe, 100 images)", step, probe["accuracy"])
        if on_save and save_every and step % save_every == 0 and step < steps:
            on_save(model, step)
            model.train()
        if on_log and ((step - 1) % log_every == 0 or step == steps):
            recent = torch.stack(losses[-log_every:]).float().cpu()
            on_log({
                "step": step, "steps": steps, "loss": float(recent[-1]),
                "loss_avg": float(recent.mean()), "lr": opt.param_groups[0]["lr"],
                "logit_scale": float(model.logit_scale.detach().exp()), "elapsed_s": time.perf_counter() - start,
            })
    return model.eval(), torch.stack(losses).float().cpu().tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- evaluation

def _draw_scene(rng: np.random.Generator, fixed: dict[str, str], held_out_ok: bool) -> tw.Scene:
    """A random scene with the given attributes fixed; a held-out pair only when allowed."""
    while True:
        scene = dataclasses.replace(tw.sample_scene(rng, held_out_ok=True), **fixed)
        if held_out_ok or (scene.shape, scene.colour) not in tw.HELD_OUT:
            return scene


@torch.no_grad()
def _classify(
    model: CLIP, image_size: int, labels: list[str], classes: list[dict[str, str]], n_per_class: int,
    rng: np.random.Generator, held_out_ok: bool = False, batch_size: int = 256,
) -> dict[str, Any]:
    """Zero-shot accuracy (percent) over images of `classes`, predicted among `labels`.

    classes[i] fixes the scene attributes of class i, whose true label is labels[i];
    labels may be longer than classes (extra distractor labels).
    """
    model = model.eval()
    device = next(model.parameters()).device
    tokens = open_clip.tokenize([TEMPLATE.format(label) for label in labels]).long().to(device)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    correct = 0
    targets = [i for i in range(len(classes)) for _ in range(n_per_class)]
    for lo in range(0, len(targets), batch_size):
        chunk = targets[lo:lo + batch_size]
        images = [tw.render(_draw_scene(rng, classes[i], held_out_ok), image_size, rng) for i in chunk]
        feats = F.normalize(model.encode_image(_to_tensor(images).to(device)), dim=-1)
        pred = (feats @ text.T).argmax(dim=1).cpu()
        correct += int((pred == torch.tensor(chunk)).sum())
    return {
        "accuracy": 100.0 * correct / len(targets),
        "chance": 100.0 / len(labels),
        "n_classes": len(labels),
        "n_images": len(targets),
    }


def zero_shot_report(model: CLIP, image_size: int, n_per_class: int, seed: int) -> dict[str, Any]:
    """Zero-shot accuracy (percent, with chance level) on freshly rendered toy-world images.

    Prompt ``"a photo of a {label}."``. Attribute tasks (photo style, other attributes
    random, seen shape-colour pairs only) use the labels ``<shape>``, ``<colour> object``,
    ``<pattern> object``, ``<size> object`` and ``object on a <background> background``.
    Compositions use ``<colour> <shape>``: held-out pairs among the held-out labels
    (``composition_novel``), seen pairs among the seen labels (``composition_seen``), and
    each among all pairs (``..._all_pairs``, where the seen labels compete with the novel
    ones). ``shape_by_style`` is shape accuracy per rendering style with the same prompt.
    """
    model = model.eval()

    def rng_for(task: str) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(task.encode())])

    report: dict[str, Any] = {"template": TEMPLATE, "n_per_class": n_per_class, "seed": seed, "unit": "percent"}
    attribute_tasks = {
        "shape": ("shape", tw.SHAPES, "{}"),
        "colour": ("colour", tuple(tw.COLOURS), "{} object"),
        "pattern": ("pattern", tw.PATTERNS, "{} object"),
        "size": ("size", tw.SIZES, "{} object"),
        "background": ("background", tw.BACKGROUNDS, "object on a {} background"),
    }
    for task, (field, values, label) in attribute_tasks.items():
        report[task] = _classify(
            model, image_size, [label.format(v) for v in values], [{field: v, "style": "photo"} for v in values],
            n_per_class, rng_for(task),
        )
    all_pairs = [(s, c) for s in tw.SHAPES for c in tw.COLOURS]
    novel = [p for p in all_pairs if p in tw.HELD_OUT]
    seen = [p for p in all_pairs if p not in tw.HELD_OUT]

    def pair_classes(pairs):
        return [{"shape": s, "colour": c, "style": "photo"} for s, c in pairs]

    def pair_labels(pairs):
        return [f"{c} {s}" for s, c in pairs]

    report["composition_novel"] = _classify(
        model, image_size, pair_labels(novel), pair_classes(novel), n_per_class, rng_for("novel"), held_out_ok=True)
    report["composition_seen"] = _classify(
        model, image_size, pair_labels(seen), pair_classes(seen), n_per_class, rng_for("seen"))
    # all 100 labels, images of one group: seen labels listed after the novel ones
    report["composition_novel_all_pairs"] = _classify(
        model, image_size, pair_labels(novel + seen), pair_classes(novel), n_per_class, rng_for("novel_all"),
        held_out_ok=True)
    report["composition_seen_all_pairs"] = _classify(
        model, image_size, pair_labels(seen + novel), pair_classes(seen), n_per_class, rng_for("seen_all"))
    report["shape_by_style"] = {
        style: _classify(
            model, image_size, list(tw.SHAPES), [{"shape": s, "style": style} for s in tw.SHAPES],
            n_per_class, rng_for(f"style/{style}"),
        )
        for style in tw.STYLES
    }
    return report


# --------------------------------------------------------------------------- command line

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _summary(report: dict[str, Any]) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict) and "accuracy" in value:
            lines.append(f"{key:30s} {value['accuracy']:6.1f}  (chance {value['chance']:.1f}, {value['n_classes']}-way)")
        elif key == "shape_by_style":
            for style, v in value.items():
                lines.append(f"shape/{style:24s} {v['accuracy']:6.1f}  (chance {v['chance']:.1f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.toy_pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required="--render-only" not in (argv if argv is not None else sys.argv), help="weights file to write (OpenAI format, fp16)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training: overrides --steps with the count that fits (recorded in the sidecar)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--config", default=None, help="an open_clip model config JSON to train instead of toy-clip")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads; bit-for-bit reruns on CPU need the same")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering the pool (does not change it)")
    parser.add_argument("--pool-size", type=int, default=None, help="pre-rendered scenes (default: batch size x steps, at most 200000)")
    parser.add_argument("--captions-per-image", type=int, default=8)
    parser.add_argument("--render-only", action="store_true", help="write the pool to --pool-cache and stop")
    parser.add_argument("--pool-cache", default=None, help="an .npz file: the pool is read from it when it was made "
                        "with the same seed, size and image size, else rendered and written there")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=80)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-per-class", type=int, default=50, help="images per class in the zero-shot report; 0 skips it")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--probe-every", type=int, default=200, help="steps between zero-shot shape probes in the log; 0: none")
    parser.add_argument("--save-every", type=int, default=0, help="also write the weights every N steps (0: only at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # reproducible reruns on the same kind of GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    config = json.loads(Path(args.config).read_text()) if args.config else open_clip.get_model_config(CONFIG_NAME)
    image_size = config["vision_cfg"]["image_size"]
    if args.render_only and not args.pool_cache:
        parser.error("--render-only needs --pool-cache")
    out = Path(args.out or ".")
    if args.out:
        out.parent.mkdir(parents=True, exist_ok=True)

    def log(entry: dict[str, Any]) -> None:
        _logger.info(
            "step %d/%d loss %.4f (avg %.4f) lr %.2e scale %.1f %.0fs", entry["step"], entry["steps"], entry["loss"],
            entry["loss_avg"], entry["lr"], entry["logit_scale"], entry["elapsed_s"],
        )

    def save(model: CLIP, step: int) -> None:
        save_openai_checkpoint(copy.deepcopy(model).cpu().half(), out)
        _logger.info("step %d: wrote %s", step, out)

    start = time.perf_counter()
    pool_size = args.pool_size or min(200_000, args.batch_size * args.steps)
    meta = {"seed": args.seed, "size": pool_size, "image_size": image_size, "captions_per_image": args.captions_per_image}
    pool = load_pool(args.pool_cache, meta) if args.pool_cache else None
    if pool is None:
        pool = render_pool(pool_size, image_size, args.seed, captions_per_image=args.captions_per_image,
                           workers=args.workers)
        if args.pool_cache:
            save_pool(pool, args.pool_cache, meta)
    if args.render_only:
        _logger.info("pool of %d scenes in %s (%.0f s)", pool_size, args.pool_cache, time.perf_counter() - start)
        return 0
    pool_s = time.perf_counter() - start
    _logger.info("rendered a pool of %d scenes in %.0f s", pool_size, pool_s)
    model, losses = pretrain(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, log_every=args.log_every, probe_every=args.probe_every, on_log=log, pool=pool,
        device=device, config=config, time_budget_s=args.time_budget, save_every=args.save_every, on_save=save,
    )
    train_s = time.perf_counter() - start - pool_s
    half = copy.deepcopy(model).cpu().half()
    save_openai_checkpoint(half, out)
    loaded = load_clip(str(out), device)  # report on exactly what was shipped
    n_params = sum(p.numel() for p in loaded.parameters())
    report = None
    if args.eval_per_class > 0:
        report = zero_shot_report(loaded, clip_info(loaded)["image_size"], args.eval_per_class, seed=args.seed + 1000)
        _logger.info("zero-shot report:\n%s", _summary(report))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "time_budget")}
    settings["steps"] = len(losses)
    settings["pool_size"] = pool_size
    reproduce = [f"--out {out.name}"] + [
        f"--{k.replace('_', '-')} {v}" for k, v in settings.items()
        if v is not None and k not in ("eval_per_class", "log_every", "probe_every", "save_every", "workers", "pool_cache",
                                       "render_only")
    ]
    sidecar = {
        "reproduce": "python -m benchmark.toy_pretrain " + " ".join(reproduce),
        "config": Path(args.config).stem if args.config else CONFIG_NAME,
        "config_json": config,
        "settings": settings,
        "time_budget_s": args.time_budget,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "weights_file": out.name,
        "weights_sha256": _sha256(out),
        "weights_bytes": out.stat().st_size,
        "dtype": "float16",
        "n_parameters": n_params,
        "pretrain_style_shares": tw.PRETRAIN_STYLE_SHARES,
        "held_out_pairs": sorted(tw.HELD_OUT),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "numpy": np.__version__},
        "pool_wall_s": pool_s,
        "train_wall_s": train_s,
        "total_wall_s": time.perf_counter() - start,
        "final_loss": float(np.mean(losses[-20:])),
        "final_loss_note": "mean over the last 20 steps",
        "first_loss": losses[0],
        "zero_shot": report,
    }
    sidecar_path = out.with_suffix(".json")
    sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    _logger.info("wrote %s (%d bytes) and %s", out, out.stat().st_size, sidecar_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
