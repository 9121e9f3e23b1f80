"""What the command line shows: tables, the sweep's live progress, the dry run's plan.

Rendering only (rich on the console); the numbers come from ``benchmark.tables`` and
``benchmark.sweep``.  ``console`` is the one console every command prints to.
"""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmark.record_settings import settings_notes
from benchmark.tables import NOTE, TRANSFER_NOTE, cell

console = Console(stderr=False)

TOY_NOTE = ("[bold cyan]Toy world:[/] generated scenes and a small CLIP pre-trained on such scenes (on one "
            "GPU, shipped with the repository). This is not the paper's data: the numbers show how methods "
            "behave in the toy world only. Pass --root DATA and --clip WEIGHTS for real results.")
SYNTHETIC_NOTE = ("[bold yellow]Synthetic world: fake datasets and a tiny CLIP with random "
                  "weights. These numbers only show that the pipeline runs; they mean nothing "
                  "about any method.[/] Pass --root DATA and --clip WEIGHTS for real results.")

def print_table(table, title: str) -> None:
    """One rich table per method (per setting of a method split into settings), narrow enough
    for 80 columns (std and the published Base/Novel are in the markdown and CSV files)."""
    for method, rows in table.groupby("method", sort=False):
        rich_table = Table(title=escape(f"{title}: {method}"))  # a label's [backbone=...] is text
        for column in ("Dataset", "Base", "Novel", "HM", "Seeds", "Paper HM", "ΔHM"):
            rich_table.add_column(column, justify="left" if column == "Dataset" else "right")
        for r in rows.itertuples(index=False):
            delta = f"{r.delta_hm:+.2f}" if r.delta_hm == r.delta_hm else "-"
            rich_table.add_row(r.dataset, cell(r.base), cell(r.novel), cell(r.hm), str(r.seeds),
                               cell(r.paper_hm), delta)
        console.print(rich_table)
    console.print(NOTE, style="dim")
    show_settings(table)


def show_settings(table) -> None:
    """Which methods' records of several settings are shown as separate rows (and by what)."""
    for line in settings_notes(table):
        console.print(line, style="yellow", soft_wrap=True, highlight=False, markup=False)


PROTOCOL_TITLES = {"base2novel": "Base-to-novel", "cross_dataset": "Cross-dataset",
                   "domain_generalization": "Domain generalisation", "few_shot": "Few-shot"}
WORLD_TITLES = {"real": "", "toy": " (toy world)",
                "synthetic": " (synthetic data, tiny random CLIP: meaningless)"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def sweep_counts(state) -> str:
    """'3 done, 2 running, 0 failed, 5 skipped' (+ running elsewhere) of a SweepState."""
    text = f"{state.done} done, {state.running} running, {state.failed} failed, {state.skipped} skipped"
    return text + (f", {state.elsewhere} elsewhere" if state.elsewhere else "")


@contextlib.contextmanager
def sweep_display(executor: str):
    """The sweep's progress, as (sweep events, run progress) callbacks for ``run_sweep``: on a
    terminal a live rich line for the sweep (runs done, running, failed and skipped, elapsed
    time, time left) and one for the run in progress (steps, then images); plain lines for
    the sweep otherwise (logs, CI, captured output)."""
    if not console.is_terminal:
        def plain(event: str, spec, state) -> None:
            if event == "start":
                console.print(f"[{state.started_runs}/{state.todo}] {spec.label}", highlight=False)
            elif event == "failed":
                console.print(f"  [red]failed[/]: {spec.label}", highlight=False)
            elif event == "elsewhere":
                console.print(f"  running in another sweep: {spec.label}", highlight=False, markup=False)

        yield plain, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
                   TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("left {task.fields[eta]}"),
                   console=console, refresh_per_second=4)
    task = bar.add_task(executor, total=None, counts="starting", eta="-")
    # the run in progress (sweeps in this process): training steps, then evaluated images
    inner = bar.add_task("", total=None, counts="", eta="-", visible=False)

    def run_progress(stage: str, done: int, total: int, text: str) -> None:
        task_view = bar.tasks[inner]
        new_stage = task_view.description != stage
        if new_stage:
            bar.reset(inner, total=total, description=stage, visible=True)
        rate = done / task_view.elapsed if task_view.elapsed else 0.0
        unit = "steps" if stage == "train" else "img"
        left = (total - done) / rate if rate else None
        # drawn at once when a stage starts (a short run may end between two refreshes)
        bar.update(inner, completed=done, total=total, counts=f"{text}, {rate:.1f} {unit}/s", eta=_duration(left),
                   refresh=new_stage)

    def sweep_events(event: str, spec, state) -> None:
        bar.update(task, total=max(state.todo, 1), completed=state.settled, counts=sweep_counts(state),
                   eta=_duration(state.eta()))
        if event == "start":
            bar.update(inner, visible=False, description="")
        if event == "failed":
            bar.console.print(f"  [red]failed[/]: {spec.label}", highlight=False)
        elif event == "elsewhere":
            bar.console.print(f"  running in another sweep: {spec.label}", highlight=False, markup=False)

    with bar:
        yield sweep_events, run_progress


def show_table(protocol: str, table, title: str) -> None:
    if protocol == "base2novel":
        print_table(table, title)
    else:
        print_accuracy_table(protocol, table, title)


def print_accuracy_table(protocol: str, table, title: str) -> None:
    """One rich table per method: datasets as rows, one column per shot count (and the
    published number with the difference for a single shot count)."""
    for method, rows in table.groupby("method", sort=False):
        shots = sorted(rows["shots"].unique())
        rich_table = Table(title=escape(f"{title}: {method}"))  # a label's [backbone=...] is text
        rich_table.add_column("Dataset")
        for k in shots:
            rich_table.add_column(f"{k}-shot" if len(shots) > 1 else "Accuracy", justify="right")
        if len(shots) == 1:
            for column in ("Seeds", "Paper", "Δ"):
                rich_table.add_column(column, justify="right")
        for dataset, group in rows.groupby("dataset", sort=False):
            cells = group.set_index("shots")
            values = [cell(cells.loc[k, "accuracy"], cells.loc[k, "std"]) if k in cells.index else "-" for k in shots]
            if len(shots) == 1:
                c = cells.iloc[0]
                values += [str(int(c["seeds"])), cell(c["paper"]),
                           f"{c['delta']:+.2f}" if c["delta"] == c["delta"] else "-"]
            rich_table.add_row(dataset, *values)
        console.print(rich_table)
    console.print(TRANSFER_NOTE[protocol], style="dim")
    show_settings(table)


def show_plan(plan, n_specs: int, grid=None) -> None:
    """The dry run: each run with its state (and grid point), and the estimate of the work
    still to do (``benchmark.sweep.estimate``)."""
    table = Table(title=f"Dry run: {n_specs} runs")
    if grid is not None and grid.axes:
        axes = " x ".join(f"{key} ({', '.join(values)})" for key, values in grid.axes)
        console.print(f"Grid: {grid.size} points = {axes}; a point with the values a run has anyway is that "
                      "run (done once).", soft_wrap=True, highlight=False, markup=False)
    for column in ("#", "run", "state", "train steps", "eval images"):
        table.add_column(column, justify="right" if column in ("#", "train steps", "eval images") else "left",
                         overflow="fold")
    for i, row in enumerate(plan.rows, 1):
        table.add_row(str(i), row.label, row.state, str(row.steps) if row.state == "to do" else "-",
                      str(row.images) if row.state != "done" else "-")
    console.print(table)
    minutes = plan.minutes_left
    text = (f"about {minutes} min of training at the speed of the finished runs" if minutes
            else "no finished runs to estimate time from")
    if plan.unknown and minutes:
        text += f" (no estimate for {', '.join(sorted(plan.unknown))})"
    counts = plan.counts
    console.print(f"{counts['done']} done, {counts['partial']} need more evaluations, {counts['to do']} to do: "
                  f"{plan.steps_left} training steps and {plan.images_left} test images left; {text}. "
                  f"Nothing was run.")


def print_frame(frame, title: str, note: str = "") -> None:
    """A table of strings (ablation and comparison tables) on the console, with its note."""
    rich_table = Table(title=escape(title))
    for i, column in enumerate(frame.columns):
        rich_table.add_column(escape(str(column)), justify="left" if i == 0 else "right", overflow="fold")
    for row in frame.itertuples(index=False):
        rich_table.add_row(*(escape(str(v)) for v in row))  # row labels hold [setting]: text, not markup
    console.print(rich_table)
    if note:
        console.print(note, style="dim", soft_wrap=True, highlight=False, markup=False)


def show_extras(output, protocols, reference: str | None = None, run_ids=None) -> list:
    """Build and show the ablation tables of grid runs (``benchmark.ablations``) and, with a
    reference method, the other methods' differences to it (``benchmark.comparisons``);
    returns the files written."""
    from benchmark import ablations, comparisons
    from benchmark import grid as G

    keys = ablations.grid_keys(output)
    ref = G.parse_reference(reference, keys)
    found, paths = ablations.build_ablations(output, protocols, ref, run_ids)
    for ablation in found:
        title = f"Ablation: {PROTOCOL_TITLES[ablation.protocol]}{WORLD_TITLES.get(ablation.world, '')}"
        print_frame(ablation.shown, title, " ".join(ablations.all_notes(ablation)))
    if ref is not None and ref.method:
        shown, written = comparisons.build_comparisons(output, protocols, ref.method, run_ids)
        paths += written
        for name, frame, note in shown:
            print_frame(frame, f"Against {ref.method}: {name}", note)
        if not written:
            console.print(f"No runs to compare with the reference {ref.method}: it needs runs of the same "
                          "protocol, datasets, shots and seeds.", soft_wrap=True, markup=False)
    elif ref is not None and not found:
        console.print(f"--reference {reference}: no ablation table (runs of a --grid sweep) to compare in.",
                      soft_wrap=True, markup=False)
    return paths


def show_listing(root=None, plugins=()) -> None:
    """`list`: methods (paper, configs), datasets (present under ``root``?), protocols, backbones."""
    from benchmark.backbone import list_backbones
    from benchmark.protocols import PROTOCOLS
    from datasets.catalog import CATALOG, check_dataset, list_datasets
    from methods.registry import get_method, list_methods, load_plugins

    load_plugins(list(plugins))
    table = Table(title="Methods (--methods)")
    for column in ("name", "paper", "tables as", "configs"):
        table.add_column(column, overflow="fold")
    for name in list_methods():
        info = get_method(name)
        configs = "-"
        if info.config_file:
            import yaml

            variants = (yaml.safe_load(info.config_file.read_text()) or {}).get("VARIANTS", {}) or {}
            configs = info.config_file.name + (f" (+ {', '.join(variants)})" if variants else "")
        table.add_row(name, info.paper or "-", info.paper_name, configs)
    console.print(table)
    table = Table(title="Datasets (--datasets)" + (f" under {root}" if root else ""))
    for column in ("name", "folder", "classes") + (("present",) if root else ()):
        table.add_column(column)
    for name in list_datasets():
        spec = CATALOG[name]
        row = [name, spec.folder, str(spec.classes or "-")]
        if root:
            problems = check_dataset(name, root)
            missing = problems and problems[0].startswith("missing dataset folder")
            row.append("[green]yes[/]" if not problems else "[red]no[/]" if missing else "[yellow]partial[/]")
        table.add_row(*row)
    console.print(table)
    console.print("Protocols (--protocol): " + ", ".join(PROTOCOLS) + ", all")
    backbones = list_backbones()
    console.print("Backbones (--clip): a weights file, " + ", ".join(backbones["openai"]) + " (OpenAI names), "
                  "an open_clip name:tag, or a test model: " + ", ".join(backbones["tiny"]), soft_wrap=True)
    if root:
        console.print(f"Details and fixes: python run.py check --root {root}", soft_wrap=True)
