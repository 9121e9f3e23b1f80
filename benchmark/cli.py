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

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from benchmark.backbone import BackboneError
from datasets.base import DatasetError

DEFAULT_OUTPUT = "results/runs"
WORLD_BACKBONES = {"toy": "toy-clip", "synthetic": "tiny-clip-12"}
TOY_NOTE = ("[bold cyan]Toy world:[/] generated scenes and a small CLIP pre-trained on them on a "
            "CPU. This is not the paper's data: the numbers show how methods behave in the toy world "
            "only. Pass --root DATA and --clip WEIGHTS for real results.")
SYNTHETIC_NOTE = ("[bold yellow]Synthetic world: fake datasets and a tiny CLIP with random "
                  "weights. These numbers only show that the pipeline runs; they mean nothing "
                  "about any method.[/] Pass --root DATA and --clip WEIGHTS for real results.")

console = Console(stderr=False)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3; got '{text}'")


def default_world() -> str:
    from benchmark.backbone import WEIGHTS_DIR

    return "toy" if (WEIGHTS_DIR / f"{WORLD_BACKBONES['toy']}.pt").is_file() else "synthetic"


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
                     help="comma-separated registry names (default: mma,zsclip); see `run.py list`")
    run.add_argument("--protocol", default="base2novel",
                     help="base2novel (default) or all (every protocol implemented so far)")
    run.add_argument("--datasets", type=_csv, default=None,
                     help="comma-separated dataset names (default: the 11 of the protocol)")
    run.add_argument("--seeds", type=_ints, default=[1, 2, 3], help="comma-separated seeds (default: 1,2,3)")
    run.add_argument("--shots", type=int, default=16, help="shots per class (default: 16)")
    run.add_argument("--root", default=None,
                     help="folder holding the datasets in the CoOp layout (default: the toy world)")
    run.add_argument("--world", choices=("toy", "synthetic"), default=default_world(),
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
    run.add_argument("--force", action="store_true", help="re-run runs whose record already exists")
    run.add_argument("-v", "--verbose", action="store_true", help="log every epoch")

    table = sub.add_parser("table", help="rebuild the tables from the records, running nothing")
    table.add_argument("--output", default=DEFAULT_OUTPUT, help="results folder holding records/")
    table.add_argument("--protocol", default="base2novel")
    table.add_argument("--format", choices=("markdown", "csv"), default="markdown")

    sub.add_parser("list", help="list methods, datasets and protocols")
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def print_table(table, title: str) -> None:
    """One rich table per method, narrow enough for 80 columns (std and the published
    Base/Novel are in the markdown and CSV files)."""
    from benchmark.tables import NOTE, _cell

    for method, rows in table.groupby("method", sort=False):
        rich_table = Table(title=f"{title}: {method}")
        for column in ("Dataset", "Base", "Novel", "HM", "Seeds", "Paper HM", "ΔHM"):
            rich_table.add_column(column, justify="left" if column == "Dataset" else "right")
        for r in rows.itertuples(index=False):
            delta = f"{r.delta_hm:+.2f}" if r.delta_hm == r.delta_hm else "-"
            rich_table.add_row(r.dataset, _cell(r.base), _cell(r.novel), _cell(r.hm), str(r.seeds),
                               _cell(r.paper_hm), delta)
        console.print(rich_table)
    console.print(NOTE, style="dim")


WORLD_TITLES = {"real": "", "toy": " (toy world)",
                "synthetic": " (synthetic data, tiny random CLIP: meaningless)"}


def build_tables(output: str | Path, protocol: str = "base2novel", run_ids: set[str] | None = None):
    """Write the tables of every record under output, one set per world (real data, toy
    world, synthetic fakes: never mixed, and only real data is compared with published
    numbers).  Returns {world: table} restricted to ``run_ids`` (all records when None)
    and the paths written."""
    from benchmark import store, tables

    records = list(store.iter_records(output))
    paper = tables.load_paper("base2novel")
    frame = tables.records_frame(records)
    chosen = frame if run_ids is None else tables.records_frame(r for r in records if r.get("id") in run_ids)
    shown, paths = {}, []
    for world in frame["world"].unique():
        pub = paper if world == "real" else None
        table = tables.base2novel_table(frame[frame["world"] == world], paper=pub)
        name = "base2novel" if world == "real" else f"base2novel-{world}"
        written = tables.write_tables(table, Path(output) / "tables", name)
        paths += [written["markdown"], written["csv"]]
        part = chosen[chosen["world"] == world]
        if not part.empty:
            shown[world] = table if run_ids is None else tables.base2novel_table(part, paper=pub)
    return shown, paths


def prepare_world(world: str, output: Path) -> Path:
    """The built-in datasets under output (written once; rewritten when their version changes)."""
    import json

    if world == "toy":
        from benchmark.backbone import WEIGHTS_DIR
        from datasets import toy

        weights = WEIGHTS_DIR / f"{WORLD_BACKBONES['toy']}.pt"
        if not weights.is_file():
            raise FileNotFoundError(
                f"The toy world needs its pre-trained CLIP at {weights}, which is not there (it ships with "
                f"the repository: restore it with `git checkout -- benchmark/weights`). To train it again, "
                f"run the `reproduce` command of benchmark/weights/toy-clip.json (5 minutes on one GPU), "
                f"or use --world synthetic.")

        root = output / "toy_data"
        marker = root / toy.MARKER
        if not marker.is_file() or json.loads(marker.read_text()).get("version") != toy.VERSION:
            console.print(f"Writing the toy world's datasets to {root} ...")
            toy.write_toy_root(root)
        return root
    from datasets import synthetic

    root = output / "synthetic_data"
    if not (root / synthetic.MARKER).is_file():
        console.print(f"Writing synthetic datasets to {root} ...")
        synthetic.write_synthetic_root(root)
    return root


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark import backbone as B
    from benchmark import protocols
    from benchmark.sweep import run_sweep
    from datasets.catalog import BASE2NOVEL_DATASETS, check_dataset, dataset_error, get_spec
    from methods.registry import get_method, load_plugins

    _setup_logging(args.verbose)
    load_plugins(args.plugin)
    for method in args.methods:
        get_method(method)
    datasets = args.datasets or list(BASE2NOVEL_DATASETS)
    for name in datasets:
        get_spec(name)
    if args.protocol not in protocols.PROTOCOLS + ("all",):
        raise protocols.ProtocolError(f"Unknown protocol '{args.protocol}'. "
                                      f"Available: {', '.join(protocols.PROTOCOLS)}, all.")
    if args.shots < 1:
        raise ValueError(f"--shots must be at least 1, got {args.shots}.")
    opts = list(args.opts)
    if args.root is None:
        world = args.world
        root = prepare_world(world, Path(args.output))
    else:
        from datasets.toy import world_of

        root = Path(args.root)
        world = world_of(root)  # a toy or synthetic root written earlier runs with its own CLIP
    if world != "real":
        if "DATALOADER.NUM_WORKERS" not in opts[::2]:
            opts = ["DATALOADER.NUM_WORKERS", "0"] + opts  # tiny images: workers cost more than they save
        console.print(TOY_NOTE if world == "toy" else SYNTHETIC_NOTE)
    if args.root is not None:
        problems = {name: check_dataset(name, root) for name in datasets}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            messages = [str(dataset_error(name, root, p)) for name, p in problems.items()]
            raise DatasetError("\n\n".join(messages) + f"\n\n{len(problems)} of {len(datasets)} datasets "
                               "are not ready. Fix them, or leave them out with --datasets.")
    backbone = args.clip or WORLD_BACKBONES.get(world, B.DEFAULT_BACKBONE)
    backbone_id = B.backbone_fingerprint(backbone)
    specs = protocols.expand(args.protocol, methods=args.methods, datasets=datasets, seeds=args.seeds,
                             shots=args.shots, root=str(root), backbone=backbone,
                             backbone_id=backbone_id, user_yaml=args.config_file, opts=opts)

    def progress(event: str, spec, index: int, total: int) -> None:
        if event == "start":
            console.print(f"[{index}/{total}] {spec.label}")
        elif event == "failed":
            console.print(f"  [red]failed[/]: {spec.label}")

    summary = run_sweep(specs, args.output, device=args.device, force=args.force, progress=progress)
    console.print(f"Runs: {len(summary.done)} done, {len(summary.skipped)} already finished, "
                  f"{len(summary.failed)} failed, in {summary.seconds:.1f} s")
    for label, error in summary.failed:
        console.print(f"  [red]{label}[/]: {error}")
    shown, paths = build_tables(args.output, run_ids={spec.run_id for spec in specs})
    for world, table in shown.items():
        print_table(table, "Base-to-novel" + WORLD_TITLES.get(world, ""))
    console.print("Tables: " + ", ".join(str(p) for p in paths), soft_wrap=True)
    return 1 if summary.failed else 0


def cmd_table(args: argparse.Namespace) -> int:
    shown, paths = build_tables(args.output, args.protocol)
    if not shown:
        console.print(f"No finished {args.protocol} runs under {args.output}/records.")
        return 1
    for world, table in shown.items():
        if args.format == "csv":
            print(f"# {world}")
            print(table.to_csv(index=False, float_format="%.4f"), end="")
        else:
            print_table(table, args.protocol + WORLD_TITLES.get(world, ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from datasets.catalog import list_datasets
    from methods.registry import get_method, list_methods

    table = Table(title="Methods")
    for column in ("name", "paper", "config"):
        table.add_column(column)
    for name in list_methods():
        info = get_method(name)
        table.add_row(name, info.paper, str(info.config_file.name) if info.config_file else "-")
    console.print(table)
    console.print("Datasets: " + ", ".join(list_datasets()))
    console.print("Protocols: base2novel, all")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "table": cmd_table, "list": cmd_list}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        console.print("Interrupted: finished runs are saved; run the same command again to resume.")
        return 130
    except (ValueError, OSError, RuntimeError, DatasetError, BackboneError) as exc:
        # soft wrap: paths in messages must stay copyable
        console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
        return 2
