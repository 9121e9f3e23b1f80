"""``python run.py bench``: speed and memory of each method, every fast path against the plain path.

Everything is measured in one process, on one device, several times (the median is
reported):

* ``text_ms``: one training step's text side (prompt assembly, text transformer forward
  and backward) for ``--text-classes`` class names, for methods that train through the
  text encoder;
* ``train_img_s``: full training steps (forward, loss, backward, optimiser) on random
  images at the method's batch size and the official precision;
* ``eval_img_s``: evaluation of the test split of a dataset written on disk (real JPEG
  files through the real loaders); the fast path is timed with its caches filled (as
  every run after the first one of a sweep finds them), ``eval_cold_img_s`` with empty ones;
* ``run_s``: one complete base-to-novel run (training, base and novel evaluation, the
  record) on that dataset, through the same ``execute`` as a sweep: plain, fast with
  empty caches (the first seed of a sweep) and fast with filled ones (every later seed);
* ``toy_stages``: where the time of one complete toy-world base-to-novel run goes (its
  record's ``timings.stages``: imports, datasets, model, data loading, training steps,
  evaluation, writing; ``benchmark.stages``), plain, fast with empty caches and fast with
  filled ones, on ``--toy-dataset`` (the toy world as a sweep reads it, written once per
  machine);
* ``peak_mb``: peak GPU memory of the training steps (CUDA only);
* ``tflops`` and ``peak_share``: the training step's floating-point work (counted by
  torch's FLOP counter) per second, and its share of the device's peak (CUDA only).

Results go to ``<output>/bench/<time>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

# dense fp16/bf16 tensor-core peaks (TFLOP/s) of the accelerators the numbers are read on
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
MODES = ("plain", "fast")


@dataclass
class BenchSettings:
    methods: list[str]
    backbone: str = "tiny-clip-12"
    device: str | None = None
    output: Path = Path("results")
    classes: int = 20  # classes of the bench dataset (half are base, half novel)
    shots: int = 16
    test_per_class: int = 10
    image_px: int = 256  # side of the JPEGs written (real datasets are a few hundred pixels)
    text_classes: int = 1000  # class names in the text-side measurement (ImageNet has 1000)
    epochs: int = 0  # > 0: override the training epochs of the complete run
    repeats: int = 3
    run_repeats: int = 0  # repetitions of the complete runs (0: as ``repeats``)
    steps: int = 5  # training steps per timed repetition
    peak_tflops: float = 0.0  # 0: look the device up in PEAK_TFLOPS
    skip_run: bool = False
    toy_dataset: str = "eurosat"  # the toy-world slot of the stage breakdown ("" or "none": none)
    opts: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def class_names(n: int) -> list[str]:
    """Made-up class names of ImageNet-like token lengths (two to six words)."""
    words = ["red", "tailed", "spotted", "northern", "grey", "sea", "mountain", "striped", "giant",
             "crested", "desert", "long", "horned", "river", "snow", "golden", "black", "water"]
    things = ["heron", "lizard", "beetle", "warbler", "terrier", "moth", "crab", "finch", "snake",
              "spaniel", "frog", "hawk", "orchid", "mushroom", "turtle", "owl", "lemur", "shark"]
    names = []
    for i in range(n):
        extra = [words[(i * 7 + k) % len(words)] for k in range(i % 4)]
        names.append(" ".join(extra + [words[i % len(words)], things[(i // len(words)) % len(things)], f"{i}"]))
    return names


def write_bench_dataset(root: Path, s: BenchSettings) -> Path:
    """A Caltech101-layout dataset of real JPEG files (written once per size)."""
    from datasets.synthetic import MARKER, write_synthetic_dataset

    tag = f"c{s.classes}-k{s.shots}-t{s.test_per_class}-p{s.image_px}"
    data = root / tag
    done = data / "written.json"
    if not done.is_file():
        shutil.rmtree(data, ignore_errors=True)
        write_synthetic_dataset("caltech101", data, names=class_names(s.classes), n_train=s.shots,
                                n_val=min(4, s.shots), n_test=s.test_per_class, image_size=s.image_px)
        (data / MARKER).write_text(json.dumps({"world": "synthetic"}) + "\n")
        done.write_text(json.dumps(asdict(s), default=str) + "\n")
    return data


# -- measurements ---------------------------------------------------------------------------
def _config(method: str, s: BenchSettings, mode: str, cache_dir: Path, image_size: int):
    import benchmark

    cfg = benchmark.make_config(method, "caltech101", **{"SPEED.ENABLED": mode == "fast",
                                                         "SPEED.CACHE_DIR": str(cache_dir)})
    from benchmark.config import merge_opts

    merge_opts(cfg, s.opts)
    cfg.INPUT.SIZE = (image_size, image_size)
    cfg.freeze()
    return cfg


def _text_pass(model) -> Callable[[], torch.Tensor] | None:
    """The text side of a training step, for methods that train through the text encoder."""
    learner = getattr(model, "prompt_learner", None)
    if type(model).__name__ == "CoCoOp":
        return None  # its prompts depend on each image: measured by the training step
    if hasattr(model, "encode_text") and callable(model.encode_text) and model.trainable_parameters():
        return model.encode_text
    if learner is not None and model.trainable_parameters():
        return lambda: model.encode_prompts(learner(), learner.tokenized_prompts)
    return None


def measure_method(method: str, clip: torch.nn.Module, s: BenchSettings, device: torch.device,
                   cache_dir: Path, data_root: Path, backbone_id: str) -> dict:
    from benchmark import trainer
    from benchmark.backbone import clip_info
    from benchmark.loaders import eval_inputs
    from benchmark.models import dataset_context, prepare_model
    from benchmark.precision import autocast, grad_scaler
    from datasets.build import build_dataset
    from methods.registry import ClassesNotSupported

    size = clip_info(clip)["image_size"]
    base = build_dataset("caltech101", data_root, num_shots=s.shots, seed=1, subsample="base")
    everything = build_dataset("caltech101", data_root, num_shots=0, seed=1, subsample="all")
    out: dict = {"method": method}
    for mode in MODES:
        cfg = _config(method, s, mode, cache_dir, size)
        torch.manual_seed(0)
        # text side, at ImageNet's class count
        big, _, precision = prepare_model(method, cfg, dataset_context("imagenet", class_names(s.text_classes)),
                                          device=device, clip=copy.deepcopy(clip))
        out["precision"] = precision
        text = _text_pass(big)
        if text is not None:
            big.train()

            def text_step():
                with autocast(device, precision, training=True):
                    features = text()
                features.float().sum().backward()

            out[f"text_ms_{mode}"] = 1000 * _median_time(text_step, device, s.repeats)
        # training steps on random images of the base classes
        model, _, _ = prepare_model(method, cfg, dataset_context("caltech101", base.classnames, shots=s.shots),
                                    device=device, clip=copy.deepcopy(clip))
        params = model.trainable_parameters()
        if params and model.fit is None:
            batch = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.randint(0, len(base.classnames), (batch,), device=device)
            optimizer = trainer.build_optimizer(params, cfg)
            scaler = grad_scaler(precision)

            def step():
                with autocast(device, precision, training=True):
                    loss = model.loss(model(images), labels)
                trainer.optimizer_step(loss, optimizer, scaler)

            def steps():
                for _ in range(s.steps):
                    step()

            model.train()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _median_time(steps, device, s.repeats)
            out[f"train_img_s_{mode}"] = s.steps * batch / seconds
            if device.type == "cuda":
                out[f"peak_mb_{mode}"] = torch.cuda.max_memory_allocated(device) / 2**20
                flops = _step_flops(step)
                out[f"tflops_{mode}"] = flops / (seconds / s.steps) / 1e12
                peak = s.peak_tflops or _peak_tflops(device)
                if peak:
                    out[f"peak_share_{mode}"] = out[f"tflops_{mode}"] / peak
        # evaluation of the test split (every class)
        if model.fit is not None:
            from benchmark.trainer import FitContext

            model.fit(FitContext(base.train, base.val, cfg, device, precision, backbone_id))
        test = everything.test
        try:
            model.use_dataset(dataset_context("caltech101", everything.classnames, shots=s.shots))
        except ClassesNotSupported:  # a linear probe knows its training classes only
            test = base.test
        n = out["eval_images"] = len(test)

        def evaluation():
            trainer.evaluate(model, test, eval_inputs(model, cfg, device, backbone_id), precision)

        if mode == "fast":
            shutil.rmtree(cache_dir, ignore_errors=True)
            start = time.perf_counter()
            evaluation()
            _sync(device)
            out["eval_cold_img_s_fast"] = n / (time.perf_counter() - start)
        out[f"eval_img_s_{mode}"] = n / _median_time(evaluation, device, s.repeats, warmup=0 if mode == "plain" else 1)
    for key in ("text_ms", "train_img_s", "eval_img_s"):
        if f"{key}_plain" in out and f"{key}_fast" in out:
            ratio = out[f"{key}_plain"] / out[f"{key}_fast"] if key == "text_ms" else out[f"{key}_fast"] / out[f"{key}_plain"]
            out[f"{key}_speedup"] = ratio
    return out


def logit_gap(method: str, clip: torch.nn.Module, s: BenchSettings, device: torch.device,
              cache_dir: Path, classnames: list[str]) -> dict:
    """How far the fast path's logits are from the plain path's, on this device and at the
    method's precision: before training, and after three optimiser steps on the same
    batch (relative to the largest logit)."""
    from benchmark import trainer
    from benchmark.backbone import clip_info
    from benchmark.models import dataset_context, prepare_model
    from benchmark.precision import autocast

    size = clip_info(clip)["image_size"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, size, size, generator=generator).to(device)
    labels = torch.arange(4, device=device) % len(classnames)
    logits = {}
    for mode in MODES:
        cfg = _config(method, s, mode, cache_dir, size)
        torch.manual_seed(0)
        model, _, precision = prepare_model(method, cfg, dataset_context("caltech101", classnames), device=device,
                                            clip=copy.deepcopy(clip))
        params = model.trainable_parameters()
        trained = model.fit is None and bool(params)
        optimizer = trainer.build_optimizer(params, cfg) if trained else None
        model.train()
        outputs = []
        for step in range(4 if trained else 1):
            with autocast(device, precision, training=True):
                out = model(images)
                loss = model.loss(out, labels)
            outputs.append(out.detach().float())
            if trained and step < 3:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        logits[mode] = outputs
    scale = logits["plain"][0].abs().max().item() or 1.0
    gaps = [(a - b).abs().max().item() / scale for a, b in zip(logits["plain"], logits["fast"])]
    return {"logit_gap": gaps[0], "logit_gap_after_steps": gaps[-1]}


def _step_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _peak_tflops(device: torch.device) -> float:
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return 0.0


def measure_run(method: str, s: BenchSettings, device: torch.device, cache_dir: Path, data_root: Path,
                backbone_id: str) -> dict:
    """Wall time of complete base-to-novel runs through ``execute``, all of seed 1: plain,
    fast with empty caches, and fast with the caches the first fast run left (what every
    later seed, shot count or frozen-encoder method of a sweep finds).  The three records'
    accuracies are kept side by side: the fast paths must not change them."""
    from benchmark.protocols import base2novel
    from benchmark.trainer import execute

    def spec(seed: int, mode: str):
        opts = ["DATALOADER.NUM_WORKERS", "4", "SPEED.CACHE_DIR", str(cache_dir), "SPEED.ENABLED", str(mode == "fast")]
        if s.epochs > 0:
            opts += ["OPTIM.MAX_EPOCH", str(s.epochs)]
        return base2novel([method], ["caltech101"], [seed], s.shots, root=str(data_root), backbone=s.backbone,
                          backbone_id=backbone_id, opts=opts + list(s.opts))[0]

    out: dict = {}
    for label, seed, mode, clear in (("plain", 1, "plain", True), ("fast_cold", 1, "fast", True),
                                     ("fast", 1, "fast", False)):
        times, accuracy = [], None
        for _ in range((s.run_repeats or s.repeats) if label != "fast_cold" else 1):
            if clear:
                shutil.rmtree(cache_dir, ignore_errors=True)
            start = time.perf_counter()
            record = execute(spec(seed, mode), device)
            _sync(device)
            times.append(time.perf_counter() - start)
            accuracy = (record["metrics"]["base"].get("accuracy"), record["metrics"]["novel"].get("accuracy"))
        out[f"run_s_{label}"] = statistics.median(times)
        out[f"run_acc_{label}"] = accuracy
    # a time: the speed-up is plain over fast
    out["run_s_speedup"] = out["run_s_plain"] / out["run_s_fast"]
    out["run_s_speedup_cold"] = out["run_s_plain"] / out["run_s_fast_cold"]
    return out


def measure_toy_stages(method: str, s: BenchSettings, device: torch.device, workdir: Path,
                       announce: Callable[[str], None] = print) -> dict:
    """One complete toy-world base-to-novel run of ``method`` (seed 1, ``s.toy_dataset``, the
    toy world's own CLIP, no loader workers, as a sweep runs it): plain (every fast path
    off), fast with empty caches and nothing decoded in memory (the first run of a sweep),
    and fast with what that run left (every later one).  Returns each one's stage breakdown
    (``imports``: this process's, paid once per process), accuracies, whether the three
    records agree on every evaluation's correct count, and the largest gap between their
    epoch losses relative to the loss (the text fast paths round differently in the last
    bits; the image paths not at all)."""
    from benchmark import stages
    from benchmark.backbone import backbone_fingerprint
    from benchmark.image_memory import STORE
    from benchmark.protocols import base2novel
    from benchmark.trainer import execute
    from datasets.worlds import WORLD_BACKBONES, prepare_world

    started = time.perf_counter()
    root = prepare_world("toy", workdir, announce)
    out: dict = {"toy_dataset": s.toy_dataset, "toy_world_s": time.perf_counter() - started}
    backbone = WORLD_BACKBONES["toy"]
    cache = workdir / "toy_cache"
    seen = []
    for label, fast, clear in (("plain", False, True), ("fast_cold", True, True), ("fast", True, False)):
        if clear:
            shutil.rmtree(cache, ignore_errors=True)
            STORE.clear()
        opts = ["DATALOADER.NUM_WORKERS", "0", "SPEED.CACHE_DIR", str(cache), "SPEED.ENABLED", str(fast)]
        if s.epochs > 0:
            opts += ["OPTIM.MAX_EPOCH", str(s.epochs)]
        spec = base2novel([method], [s.toy_dataset], [1], s.shots, root=str(root), backbone=backbone,
                          backbone_id=backbone_fingerprint(backbone), opts=opts + list(s.opts))[0]
        record = execute(spec, device)
        breakdown = dict(record["timings"]["stages"])
        breakdown["imports"] = stages.imports_seconds()
        out[f"toy_stages_{label}"] = breakdown
        out[f"toy_acc_{label}"] = tuple(record["metrics"][k].get("accuracy") for k in ("base", "novel"))
        seen.append(({k: v.get("n_correct") for k, v in record["metrics"].items()},
                     record["train"].get("epoch_losses") or []))
    out["toy_same"] = all(counts == seen[0][0] for counts, _ in seen)
    out["toy_loss_gap"] = max((abs(a - b) / max(abs(b), 1e-12) for _, losses in seen[1:]
                               for a, b in zip(losses, seen[0][1])), default=0.0)
    return out


def toy_markdown(rows: list[dict]) -> str:
    """The stage breakdown of each method's toy run: plain / fast, empty caches / fast."""
    from benchmark import stages

    parts = []
    for row in rows:
        if "toy_stages_plain" not in row:
            continue
        columns = {"plain": row["toy_stages_plain"], "fast, empty caches": row["toy_stages_fast_cold"],
                   "fast": row["toy_stages_fast"]}
        accs = " / ".join("/".join("-" if v is None else f"{v:.2f}" for v in row[f"toy_acc_{k}"])
                          for k in ("plain", "fast_cold", "fast"))
        parts.append(f"Toy-world run, {row['method']} on {row['toy_dataset']} (base-to-novel, seed 1): seconds "
                     f"per stage (imports: this process's, once per process). Base/novel accuracy plain / fast "
                     f"cold / fast: {accs}; correct counts {'identical' if row['toy_same'] else 'DIFFERENT'}, largest "
                     f"relative gap between epoch losses {row['toy_loss_gap']:.1e}.\n\n"
                     + stages.table(columns))
    return "\n\n".join(parts)


def run_bench(s: BenchSettings, console=None) -> tuple[list[dict], Path]:
    from benchmark import backbone as B
    from benchmark.backbone import load_clip, resolve_device

    device = resolve_device(s.device)
    backbone_id = B.backbone_fingerprint(s.backbone)
    workdir = Path(s.output) / "bench"
    cache_dir = workdir / "cache"
    data_root = write_bench_dataset(workdir / "data", s)
    clip = load_clip(s.backbone, "cpu")
    meta = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    device_tag = meta["device"].split(" (")[0].replace(" ", "_")
    path = workdir / f"{time.strftime('%Y%m%d-%H%M%S')}-{device_tag}.json"
    rows: list[dict] = []
    for method in s.methods:
        if console is not None:
            console.print(f"bench: {method} on {s.backbone} ({device})")
        row = measure_method(method, clip, s, device, cache_dir, data_root, backbone_id)
        row.update(logit_gap(method, clip, s, device, cache_dir, class_names(8)))
        if not s.skip_run:
            row.update(measure_run(method, s, device, cache_dir, data_root, backbone_id))
        if s.toy_dataset and s.toy_dataset != "none":
            row.update(measure_toy_stages(method, s, device, workdir,
                                          console.print if console is not None else print))
        rows.append(row)
        # written after every method: an interrupted bench keeps what it measured
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        toy = toy_markdown(rows)
        path.with_suffix(".md").write_text(markdown(rows, meta) + ("\n\n" + toy if toy else "") + "\n")
    return rows, path


COLUMNS = [
    ("text_ms", "text step (ms)", "{:.1f}"), ("train_img_s", "train (img/s)", "{:.1f}"),
    ("eval_img_s", "eval (img/s)", "{:.0f}"), ("run_s", "b2n run (s)", "{:.1f}"),
]


def _pair(row: dict, key: str, fmt: str) -> str:
    plain, fast = row.get(f"{key}_plain"), row.get(f"{key}_fast")
    if plain is None or fast is None:
        return "n/a"
    speedup = row.get(f"{key}_speedup")
    tail = f" ({speedup:.1f}x)" if speedup else ""
    return f"{fmt.format(plain)} -> {fmt.format(fast)}{tail}"


def markdown(rows: list[dict], meta: dict) -> str:
    header = ["method", "precision"] + [title for _, title, _ in COLUMNS] + [
        "b2n run, cold caches (s)", "eval cold (img/s)", "peak MB", "TFLOP/s (share)", "logit gap (after 3 steps)",
        "b2n base/novel accuracy: plain / fast cold / fast"]
    lines = [f"Device: {meta['device']}; backbone {meta['settings']['backbone']}; torch {meta['torch']}. "
             "Each cell: plain -> fast (speed-up).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], row.get("precision", "")]
        for key, _, fmt in COLUMNS:
            cells.append(_pair(row, key, fmt))
        run_cold = row.get("run_s_fast_cold")
        cells.append(f"{run_cold:.1f} ({row['run_s_speedup_cold']:.1f}x)" if run_cold else "n/a")
        cold = row.get("eval_cold_img_s_fast")
        cells.append(f"{cold:.0f}" if cold else "n/a")
        mem = row.get("peak_mb_fast")
        cells.append(f"{row.get('peak_mb_plain', 0):.0f} -> {mem:.0f}" if mem else "n/a")
        flops = row.get("tflops_fast")
        share = row.get("peak_share_fast")
        cells.append(f"{flops:.1f} ({100 * share:.1f}%)" if flops and share else f"{flops:.1f}" if flops else "n/a")
        cells.append(f"{row['logit_gap']:.1e} ({row['logit_gap_after_steps']:.1e})")
        accs = [row.get(f"run_acc_{k}") for k in ("plain", "fast_cold", "fast")]
        cells.append(" / ".join("/".join("-" if v is None else f"{v:.2f}" for v in a) for a in accs)
                     if all(accs) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
