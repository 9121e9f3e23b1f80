"""Command line: arguments -> a sweep -> records -> tables.

    python run.py --methods mma,zsclip --protocol base2novel --root DATA --clip ViT-B-16.pt
    python run.py table --output results/runs
    python run.py list

Without ``--root`` and ``--clip`` the harness runs on the toy world: generated scenes
written as datasets in the real folder layouts and a small CLIP pre-trained on such
scenes (``datasets/toy.py``).  ``--world synthetic`` uses coloured-shape fakes and a
random tiny CLIP instead: a smoke test whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from rich.logging import RichHandler
from rich.table import Table

from benchmark.backbone import BackboneError
from benchmark.display import (
    PROTOCOL_TITLES,
    SYNTHETIC_NOTE,
    TOY_NOTE,
    WORLD_TITLES,
    console,
    show_extras,
    show_plan,
    show_table,
    sweep_display,
)
from datasets.base import DatasetError
from datasets.worlds import WORLD_BACKBONES, WORLDS, default_world, prepare_world, world_of

DEFAULT_OUTPUT = "results/runs"
REFERENCE_HELP = ("show each row's difference to a reference with a paired-bootstrap 95%% interval: a grid point "
                  "for ablation tables (--reference TRAINER.MMADAPTER.ADAPTER_START=5), a method otherwise "
                  "(--reference zsclip)")
log = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3; got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Few-shot CLIP adaptation benchmark: run sweeps, build tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python run.py                       # the toy world (no data or weights needed)\n"
               "  python run.py --methods mma,zsclip --protocol base2novel --root DATA --clip ViT-B-16.pt\n"
               "  python run.py table --output results/runs\n  python run.py list")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a sweep and print its tables (the default command)")
    run.add_argument("--methods", type=_csv, default=["mma", "zsclip"],
                     help="comma-separated registry names, or all (default: mma,zsclip); see `run.py list`")
    run.add_argument("--protocol", default="base2novel",
                     help="base2novel (default), cross_dataset, domain_generalization, few_shot, all, or a "
                          "comma-separated list; e.g. --protocol cross_dataset,domain_generalization (one "
                          "ImageNet training per method and seed serves both)")
    run.add_argument("--datasets", type=_csv, default=None,
                     help="comma-separated dataset names (default: each protocol's own: the 11 for "
                          "base2novel and few_shot, the 10 targets for cross_dataset, the 4 ImageNet "
                          "variants for domain_generalization); e.g. --datasets eurosat,dtd")
    run.add_argument("--seeds", type=_ints, default=[1, 2, 3], help="comma-separated seeds (default: 1,2,3)")
    run.add_argument("--shots", type=_ints, default=None,
                     help="comma-separated shots per class (default: 16; few_shot: 1,2,4,8,16)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the runs the sweep would do, which are already done, and an estimate of the work")
    run.add_argument("--save-checkpoints", action="store_true",
                     help="save every run's learned weights under OUTPUT/checkpoints (the ImageNet training of "
                          "cross_dataset/domain_generalization always saves its own)")
    run.add_argument("--root", default=None,
                     help="folder holding the datasets in the CoOp layout (default: the toy world)")
    run.add_argument("--world", choices=WORLDS, default=default_world(),
                     help="without --root: toy (generated scenes and a CLIP pre-trained on them; "
                          "the default when its weights are shipped) or synthetic (coloured-shape "
                          "fakes and a random tiny CLIP: a smoke test whose numbers mean nothing)")
    run.add_argument("--clip", default=None,
                     help="CLIP weights: an OpenAI-format file, an OpenAI name (ViT-B/16) found in "
                          "the local cache, or an open_clip name:tag (default: ViT-B/16 for real data; the "
                          "world's own CLIP for the toy world or synthetic data, also under --root)")
    run.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results folder (default: {DEFAULT_OUTPUT})")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--config-file", default=None, help="a YAML of config keys (OPTIM.LR, ...) merged after the method's")
    run.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                     help="config overrides, e.g. --opts OPTIM.MAX_EPOCH 2 DATALOADER.NUM_WORKERS 0")
    run.add_argument("--plugin", action="append", default=[],
                     help="import this module first (registers methods from outside the repository)")
    run.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="repeatable: run every combination of these config values (an ablation; one table row "
                          "each), e.g. --grid TRAINER.MMADAPTER.ADAPTER_START=3,5,7,9")
    run.add_argument("--reference", default=None, help=REFERENCE_HELP)
    run.add_argument("--force", action="store_true", help="re-run runs whose record already exists")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show every epoch's loss and every accuracy on the console (they are always in "
                          "OUTPUT/logs/, one file per run)")
    run.add_argument("-q", "--quiet", action="store_true", help="show errors only (and the final tables)")
    scale = run.add_argument_group("scale-out", "where runs execute; every executor writes the same records to "
                                                "--output, which is all they share (README: Scaling out)")
    scale.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                       help="local (default: this machine), ray (Ray tasks, one GPU each) or slurm (one SLURM job "
                            "per run, through submitit); e.g. --executor ray --ray-address auto")
    scale.add_argument("--gpus", type=_ints, default=None,
                       help="local: one worker process per listed GPU, e.g. --gpus 0,1,2,3 (default: every visible "
                            "GPU when there are several; --device cuda:0 runs one after another on one GPU)")
    scale.add_argument("--workers", type=int, default=None,
                       help="local: worker processes (per GPU with --gpus, else on the CPU), e.g. --workers 4 "
                            "(default: in the toy and synthetic worlds on the CPU, one single-thread process per "
                            "CPU core; otherwise 1, in this process)")
    scale.add_argument("--ray-address", default=None,
                       help="ray: join this Ray cluster instead of starting a local Ray instance, e.g. "
                            "--ray-address auto (a cluster started on this machine) or ray://head-node:10001")
    scale.add_argument("--max-retries", type=int, default=2,
                       help="times a run whose worker, task or job died (killed, out of memory, node lost) is "
                            "started again before it is recorded as failed, e.g. --max-retries 0 (default 2)")
    scale.add_argument("--stale-lock-minutes", type=float, default=10.0,
                       help="a run's lock not refreshed for this long is taken over (its machine died), e.g. "
                            "--stale-lock-minutes 30 (default 10); a lock of a dead process on this host is "
                            "taken over at once")
    scale.add_argument("--slurm-partition", default=None, help="slurm: partition, e.g. --slurm-partition gpu")
    scale.add_argument("--slurm-time", default=None,
                       help="slurm: time limit per run, SLURM's format, e.g. --slurm-time 2:00:00 or 120 (minutes) "
                            "(default 4:00:00)")
    scale.add_argument("--slurm-gpus", type=int, default=None, help="slurm: GPUs per job, e.g. --slurm-gpus 0 (default 1)")
    scale.add_argument("--slurm-cpus", type=int, default=None,
                       help="slurm: CPUs per job, e.g. --slurm-cpus 8 (default: the cluster's)")
    scale.add_argument("--slurm-mem", default=None, help="slurm: memory per job, e.g. --slurm-mem 32G (default: the cluster's)")
    scale.add_argument("--slurm-array-parallelism", type=int, default=None,
                       help="slurm: jobs of the array running at once, e.g. --slurm-array-parallelism 16 "
                            "(default: SLURM's limit; --slurm-cluster local: all at once)")
    scale.add_argument("--slurm-config", default=None,
                       help="slurm: a YAML of any other submitit parameter, e.g. --slurm-config slurm.yaml holding "
                            "slurm_account: my_lab and slurm_setup: [module load cuda]; command-line options win")
    scale.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default=None,
                       help="slurm: slurm (default: submit with sbatch), local (each job a local process, to try "
                            "a SLURM sweep without SLURM) or debug (in this process), e.g. --slurm-cluster local")

    table = sub.add_parser("table", help="rebuild the tables from the records, running nothing")
    table.add_argument("--output", default=DEFAULT_OUTPUT, help="results folder holding records/")
    table.add_argument("--protocol", default="all",
                       help="base2novel, cross_dataset, domain_generalization, few_shot or all (default)")
    table.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown",
                       help="what to print (markdown and CSV files are always written under OUTPUT/tables)")
    table.add_argument("--compute", action="store_true",
                       help="also show trainable parameters, peak memory, wall time and device per run group")
    table.add_argument("--reference", default=None, help=REFERENCE_HELP)

    lister = sub.add_parser("list", help="list methods (paper, configs), datasets (present under --root?), "
                                         "protocols and backbones",
                            epilog="Example:\n  python run.py list --root /data/coop   # which datasets are there")
    lister.add_argument("--root", default=None, help="a data folder: show which datasets are present in it")
    lister.add_argument("--plugin", action="append", default=[], help="import this module first (its methods are listed)")

    check = sub.add_parser(
        "check", help="walk every dataset under --root: present, missing files, images and classes, and the fix",
        epilog="Examples:\n  python run.py check --root /data/coop\n"
               "  python run.py check --root /data/coop --datasets imagenet,eurosat",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--root", required=True, help="the folder holding the datasets in the CoOp layout")
    check.add_argument("--datasets", type=_csv, default=None, help="comma-separated datasets (default: all 15)")

    new = sub.add_parser(
        "new-method", help="write a complete small method to start from: methods/NAME.py, its YAML and its tests",
        epilog="Examples:\n  python run.py new-method my_adapter && python -m pytest -q tests/test_my_adapter.py\n"
               "  python run.py new-method my_adapter --into plugins/   # a plugin outside the repository",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    new.add_argument("name", help="registry name: lower-case letters, digits and '_', e.g. my_adapter")
    new.add_argument("--into", default=None,
                     help="write a plugin into this folder (NAME.py, configs/NAME.yaml, test_NAME.py; run it with "
                          "--plugin NAME) instead of into methods/ and tests/")
    new.add_argument("--force", action="store_true", help="overwrite files that exist")

    bench = sub.add_parser(
        "bench", help="measure speed and memory per method, every fast path against the plain path",
        description="Times, in one process and on one device, each method's text step, training steps, "
                    "evaluation and one complete base-to-novel run, with the exact fast paths off (plain) "
                    "and on (fast); repetitions give the median. Writes OUTPUT/bench/<time>-<device>.json "
                    "and .md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python run.py bench --methods mma,coop                 # tiny CLIP on the CPU\n"
               "  python run.py bench --backbone vit-b-16-random --classes 100 --device cuda\n"
               "  python run.py bench --backbone ViT-B-16.pt --skip-run")
    bench.add_argument("--methods", type=_csv, default=["mma", "coop", "zsclip"],
                       help="comma-separated methods (default: mma,coop,zsclip)")
    bench.add_argument("--backbone", default="tiny-clip-12",
                       help="CLIP to measure: tiny-clip-12 (default), vit-b-16-random (ViT-B/16 with random "
                            "weights), or any --clip value (a weights file, an open_clip name:tag)")
    bench.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    bench.add_argument("--classes", type=int, default=20,
                       help="classes of the dataset written for the evaluation and the complete run (default 20)")
    bench.add_argument("--shots", type=int, default=16, help="training images per class (default 16)")
    bench.add_argument("--test-per-class", type=int, default=10, help="test images per class (default 10)")
    bench.add_argument("--image-px", type=int, default=256, help="side of the JPEG files written (default 256)")
    bench.add_argument("--text-classes", type=int, default=1000,
                       help="class names in the text-step measurement (default 1000, as ImageNet)")
    bench.add_argument("--epochs", type=int, default=0,
                       help="training epochs of the complete run (default: the method's official number)")
    bench.add_argument("--repeats", type=int, default=3, help="repetitions of each timing; the median is kept")
    bench.add_argument("--run-repeats", type=int, default=0,
                       help="repetitions of the complete runs (default: as --repeats)")
    bench.add_argument("--steps", type=int, default=5, help="training steps per timed repetition (default 5)")
    bench.add_argument("--peak-tflops", type=float, default=0.0,
                       help="the device's peak TFLOP/s for the share column (default: known GPUs)")
    bench.add_argument("--skip-run", action="store_true", help="leave out the complete base-to-novel runs")
    bench.add_argument("--toy-dataset", default="eurosat",
                       help="toy-world slot of the stage breakdown (seconds per stage of one complete run, plain "
                            "and fast), e.g. --toy-dataset imagenet; none leaves it out (default eurosat)")
    bench.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results folder (default: {DEFAULT_OUTPUT})")
    bench.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                       help="config overrides for every measurement, e.g. --opts DATALOADER.NUM_WORKERS 8")

    from benchmark.verify import add_verify_parser

    add_verify_parser(sub)

    analyze = sub.add_parser(
        "analyze", help="analyses that are not sweeps: dataset-level, the MMA paper's layer-by-layer "
                        "dataset recognition (its Figure 1)",
        description="dataset-level: how well CLIP's text and image features at each layer (X_Embed, every "
                    "block, X_Proj) tell the datasets apart, by a linear classifier per layer; mean and std over "
                    "seeds. Writes OUTPUT/analysis/dataset_level.csv, .md and .png (README: Dataset-level analysis).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python run.py analyze dataset-level            # the toy world and its CLIP\n"
               "  python run.py analyze dataset-level --root DATA --clip ViT-B/16 --clip ViT-L/14 --device cuda")
    analyze.add_argument("analysis", choices=("dataset-level",), help="the analysis to run")
    analyze.add_argument("--root", default=None, help="folder holding the datasets (default: the built-in world)")
    analyze.add_argument("--world", choices=WORLDS, default=default_world(),
                         help="without --root: toy (default when its CLIP is shipped) or synthetic")
    analyze.add_argument("--clip", action="append", default=None,
                         help="a backbone, repeatable for one panel each, e.g. --clip ViT-B/16 --clip ViT-L/14 "
                              "(default: the world's own CLIP; ViT-B/16 for real data)")
    analyze.add_argument("--datasets", type=_csv, default=None,
                         help="comma-separated datasets (default: the 11 of base-to-novel)")
    analyze.add_argument("--seeds", type=_ints, default=[1, 2, 3], help="comma-separated seeds (default: 1,2,3)")
    analyze.add_argument("--samples-per-dataset", type=int, default=None,
                         help="training images drawn per dataset and seed, half to train the classifier, half "
                              "to test it (default 80)")
    analyze.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results folder (default: {DEFAULT_OUTPUT})")
    analyze.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmark.bench import BenchSettings, run_bench
    from methods.registry import get_method

    for method in args.methods:
        get_method(method)
    for name in ("classes", "shots", "test_per_class", "image_px", "text_classes", "repeats", "steps"):
        if getattr(args, name) < 1 or (name == "classes" and args.classes < 2):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number (--classes at least 2); "
                             f"got {getattr(args, name)}.")
    if args.toy_dataset not in ("", "none"):
        from datasets.catalog import BASE2NOVEL_DATASETS, resolve_name

        args.toy_dataset = resolve_name(args.toy_dataset)
        if args.toy_dataset not in BASE2NOVEL_DATASETS:
            raise ValueError(f"--toy-dataset must be a base-to-novel dataset ({', '.join(BASE2NOVEL_DATASETS)}) "
                             f"or none; got {args.toy_dataset}.")
    settings = BenchSettings(methods=args.methods, backbone=args.backbone, device=args.device,
                             output=Path(args.output), classes=args.classes, shots=args.shots,
                             test_per_class=args.test_per_class, image_px=args.image_px,
                             text_classes=args.text_classes, epochs=args.epochs, repeats=args.repeats,
                             run_repeats=args.run_repeats,
                             steps=args.steps, peak_tflops=args.peak_tflops, skip_run=args.skip_run,
                             toy_dataset=args.toy_dataset,
                             opts=list(args.opts))
    rows, path = run_bench(settings, console)
    console.print(path.with_suffix(".md").read_text(), soft_wrap=True, highlight=False, markup=False)
    console.print(f"Saved: {path} and {path.with_suffix('.md')}", soft_wrap=True)
    return 0


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """The console shows warnings (-v: every epoch and accuracy; -q: errors only); each
    run's own log under <output>/logs/ always holds everything."""
    handler = RichHandler(console=console, show_path=False)
    handler.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark import backbone as B
    from benchmark import grid as G
    from benchmark import protocols, tables
    from benchmark.sweep import run_sweep
    from benchmark.check import check_sweep_data
    from benchmark.files import check_writable
    from datasets.catalog import resolve_name
    from methods.registry import get_method, list_methods, load_plugins

    _setup_logging(args.verbose, args.quiet)
    from benchmark.executors import ExecutorUnavailable, options_from_args

    try:
        executor_options = options_from_args(args)  # a missing extra or a misplaced option fails first
    except ExecutorUnavailable as exc:  # its install command holds brackets: no markup
        console.print(f"Error: {exc}", style="bold red", highlight=False, soft_wrap=True, markup=False)
        return 2
    load_plugins(args.plugin)
    if args.methods == ["all"]:  # every registered method, plugins included
        args.methods = list_methods()
    for method in args.methods:
        get_method(method)
    if args.datasets is not None:  # official spellings (OxfordPets) and oxfordpets name oxford_pets
        args.datasets = list(dict.fromkeys(resolve_name(name) for name in args.datasets))
    chosen = protocols.parse_protocols(args.protocol)
    if args.shots is not None and (not args.shots or min(args.shots) < 1):
        raise ValueError(f"--shots must be positive integers such as 1,2,4; got {args.shots}.")
    if args.executor == "local":  # elsewhere (Ray, SLURM) the devices are the workers'
        B.resolve_device(args.device)
    check_writable(args.output)
    grid = G.parse_grid(args.grid)  # unknown keys, wrong types: refused before anything runs
    G.check_grid(grid, args.methods, args.opts)
    G.parse_reference(args.reference, grid.keys)
    opts = list(args.opts)
    if args.root is None:
        world = args.world
        root = prepare_world(world, Path(args.output), announce=lambda text: console.print(text, soft_wrap=True))
    else:
        root = Path(args.root)
        world = world_of(root)  # a toy or synthetic root written earlier runs with its own CLIP
    if world != "real":  # (their loaders run protocols.WORLD_LOADER_WORKERS workers on every machine)
        console.print(TOY_NOTE if world == "toy" else SYNTHETIC_NOTE)
    if "SPEED.CACHE_DIR" not in opts[::2]:
        # decoded test images and frozen-encoder features, shared by every run of this output
        opts = ["SPEED.CACHE_DIR", str(Path(args.output) / "cache")] + opts
    backbone = args.clip or WORLD_BACKBONES.get(world, B.DEFAULT_BACKBONE)
    backbone_id = B.backbone_fingerprint(backbone)
    B.clip_copy(backbone)  # a file that is not CLIP weights fails here, once, not in every run
    specs = G.expand_grid(grid, args.protocol, methods=args.methods, datasets=args.datasets, seeds=args.seeds,
                          shots=args.shots, root=str(root), backbone=backbone,
                          backbone_id=backbone_id, user_yaml=args.config_file, opts=opts)
    if args.root is not None:
        check_sweep_data(specs, root)
    if args.dry_run:
        from benchmark.sweep import estimate

        show_plan(estimate(specs, args.output), len(specs), grid)
        return 0

    from benchmark.executors import get_executor
    from benchmark.executors.local import default_workers

    if args.executor == "local" and args.workers is None and args.gpus is None:
        executor_options["workers"] = default_workers(
            tiny_model=world != "real" and args.clip is None,
            on_cpu=B.resolve_device(args.device).type == "cpu", runs=len(specs))
        if executor_options["workers"] > 1:
            console.print(f"{executor_options['workers']} worker processes, one per CPU core "
                          "(--workers 1: everything in this process).")
    with get_executor(args.executor, **executor_options) as executor, \
            sweep_display(executor.name) as (progress, run_progress):
        summary = run_sweep(specs, args.output, executor=executor, device=args.device, force=args.force,
                            save_checkpoints=args.save_checkpoints, progress=progress, plugins=args.plugin,
                            stale_lock_s=args.stale_lock_minutes * 60, run_progress=run_progress)
    elsewhere = f", {len(summary.elsewhere)} running in another sweep" if summary.elsewhere else ""
    console.print(f"Runs: {len(summary.done)} done, {len(summary.skipped)} already finished, "
                  f"{len(summary.failed)} failed{elsewhere}, in {summary.seconds:.1f} s", soft_wrap=True)
    from rich.markup import escape

    for label, error in summary.failed:
        console.print(f"  [red]{label}[/]: {escape(error)}", soft_wrap=True, highlight=False)
    for label, why in summary.elsewhere:
        console.print(f"  {label}: {why}", soft_wrap=True, highlight=False, markup=False)
    if summary.elsewhere:
        console.print("Runs of another sweep are left to it: run the same command again when it ends for "
                      "complete tables.")
    built = tables.build_tables(args.output, chosen, run_ids={spec.run_id for spec in specs})
    for (protocol, world), table in built.shown.items():
        show_table(protocol, table, PROTOCOL_TITLES[protocol] + WORLD_TITLES.get(world, ""))
        show_agreement(built.agreement.get((protocol, world)))
    extra = show_extras(args.output, chosen, args.reference, {spec.run_id for spec in specs})
    if built.damaged:
        console.print(built.skipped_note, style="yellow", soft_wrap=True, highlight=False, markup=False)
    console.print("Tables: " + ", ".join(str(p) for p in built.paths + extra), soft_wrap=True)
    return 1 if summary.failed else 0


def show_agreement(agreed) -> None:
    """The rank correlation of a toy-world table with the published averages (if any)."""
    if agreed is not None:
        console.print(agreed.line, soft_wrap=True, highlight=False, markup=False)


def cmd_table(args: argparse.Namespace) -> int:
    from benchmark import protocols, record_settings, store, tables

    chosen = protocols.parse_protocols(args.protocol)
    built = tables.build_tables(args.output, chosen)
    if built.damaged:
        console.print(built.skipped_note, style="yellow", soft_wrap=True, highlight=False, markup=False)
    if not built.shown and not any(r.get("grid") for r in store.iter_records(args.output)):
        console.print(f"No finished {args.protocol} runs under {args.output}/records.")
        return 1
    for (protocol, world), table in built.shown.items():
        title = PROTOCOL_TITLES[protocol] + WORLD_TITLES.get(world, "")
        if args.format == "csv":
            print(f"# {protocol} {world}")
            print(table.to_csv(index=False, float_format="%.4f"), end="")
        elif args.format == "latex":
            frame = tables.display_frame(table) if protocol == "base2novel" else tables.accuracy_display(table)
            print(tables.latex_table(frame, caption=title))
            for note in record_settings.settings_notes(table):  # rows split by setting (a comment in LaTeX)
                print(f"% {note}")
        else:
            show_table(protocol, table, title)
            show_agreement(built.agreement.get((protocol, world)))
    if args.compute:
        compute = tables.compute_table(r for r in store.iter_records(args.output)
                                       if r.get("protocol") in chosen + (["transfer"] if set(chosen) & {
                                           "cross_dataset", "domain_generalization"} else []))
        if args.format == "csv":
            print(compute.to_csv(index=False, float_format="%.2f"), end="")
        else:
            console.print(compute.to_markdown(index=False, floatfmt=".1f"))
    extra = show_extras(args.output, chosen, args.reference)  # ablation tables; differences to --reference
    console.print("Files: " + ", ".join(str(p) for p in built.paths + extra), soft_wrap=True)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from benchmark.display import show_listing

    show_listing(args.root, args.plugin)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """One row per dataset; the fix for each one that is not ready; exit 1 if any is not."""
    from benchmark.check import check_root

    reports = check_root(args.root, args.datasets)
    table = Table(title=f"Datasets under {args.root}")
    for column in ("dataset", "state", "classes", "train", "val", "test", "problem"):
        table.add_column(column, overflow="fold")
    colour = {"ready": "green", "missing": "red", "incomplete": "yellow"}
    for r in reports:
        table.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", str(r.classes or "-"),
                      *(str(r.images.get(k, "-")) for k in ("train", "val", "test")),
                      escape_markup("; ".join(r.problems)) or "-")
    console.print(table)
    for r in reports:
        if r.status != "ready":
            console.print(f"[bold]{r.name}[/]: {escape_markup(r.fix)}", soft_wrap=True, highlight=False)
            for example in r.examples:
                console.print(f"  absent: {example}", soft_wrap=True, highlight=False, markup=False)
    ready = sum(r.status == "ready" for r in reports)
    console.print(f"{ready} of {len(reports)} datasets ready.")
    return 0 if ready == len(reports) else 1


def cmd_new_method(args: argparse.Namespace) -> int:
    from benchmark.scaffold import new_method

    written = new_method(args.name, args.into, force=args.force)
    for path in written:
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)
    test = written[-1]
    run = (f"python run.py --methods {args.name} --world synthetic --datasets eurosat --seeds 1" if args.into is None
           else f"PYTHONPATH={written[0].parent} python run.py --plugin {args.name} --methods {args.name} "
                f"--world synthetic --datasets eurosat --seeds 1")
    console.print(f"Next: python -m pytest -q {test}   (passes as written), then\n      {run}\n"
                  "Edit the method's computation, its YAML and its first test; the README's \"Adding a method\" "
                  "walks through each file.", soft_wrap=True, highlight=False, markup=False)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from benchmark.analysis.dataset_level import analysis_settings, run_dataset_level

    settings = analysis_settings(args, announce=lambda text: console.print(text, soft_wrap=True, markup=False))
    result = run_dataset_level(settings, announce=lambda text: console.print(text, soft_wrap=True, markup=False))
    console.print(result.paths[1].read_text(), soft_wrap=True, highlight=False, markup=False)
    console.print("Files: " + ", ".join(str(p) for p in result.paths), soft_wrap=True, markup=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from benchmark.verify import show_verdicts, verify

    _setup_logging(False, True)
    announce = lambda text: console.print(text, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
    verdicts = verify(args.path, root=args.root, clip=args.clip, device=args.device, limit=args.limit,
                      methods=args.methods, announce=announce)
    return show_verdicts(verdicts, console)


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's kill, `kill PID`) ends a sweep like Ctrl-C: the current run is
    abandoned, every record already written stays, the same command resumes."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    args = build_parser().parse_args(argv)
    _interrupt_on_sigterm()
    commands = {"run": cmd_run, "table": cmd_table, "list": cmd_list, "bench": cmd_bench, "check": cmd_check,
                "new-method": cmd_new_method, "analyze": cmd_analyze, "verify": cmd_verify}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        console.print("Interrupted: finished runs are saved; run the same command again to resume.")
        return 130
    except (ValueError, OSError, RuntimeError, DatasetError, BackboneError) as exc:
        # soft wrap: paths in messages must stay copyable
        from rich.markup import escape

        console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True, markup=True)
        return 2
