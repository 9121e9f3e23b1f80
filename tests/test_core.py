"""The harness core: methods are told what they classify; the module structure has no
import cycle and no oversized file; one config path for the API and the command line."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import assert_close, clip_ops, decisive, logit_scale, tolerance

import benchmark
from benchmark import store
from benchmark.cli import main
from benchmark.loaders import eval_inputs
from benchmark.models import dataset_context
from benchmark.trainer import batch_logits
from datasets.build import build_dataset
from datasets.worlds import dataset_template

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmark", "methods", "datasets")


# -- methods are told what they classify ------------------------------------------------------
@pytest.fixture(scope="module")
def transfer_root(tmp_path_factory):
    from datasets.synthetic import write_synthetic_root

    return write_synthetic_root(tmp_path_factory.mktemp("data"), ["imagenet", "eurosat", "dtd"])


def test_zero_shot_on_a_transfer_target_equals_zero_shot_built_for_it(transfer_root, tmp_path, capsys):
    """The same test images, the same frozen CLIP: evaluated as a cross-dataset target of
    the shared ImageNet run or as the dataset's own few-shot run, zero-shot CLIP must
    classify them with the target's template and give the same accuracy."""
    out = tmp_path / "out"
    code = main(["--root", str(transfer_root), "--methods", "zsclip", "--protocol", "cross_dataset,few_shot",
                 "--datasets", "eurosat,dtd", "--seeds", "1", "--shots", "16", "--output", str(out)])
    assert code == 0, capsys.readouterr().out
    records = list(store.iter_records(out))
    transfer = next(r for r in records if r["protocol"] == "transfer")
    clip = benchmark.load_clip(transfer["backbone"])
    cfg = benchmark.make_config("zsclip", **{"INPUT.SIZE": tuple(transfer["effective_input_size"])})
    cfg.freeze()
    telling = []
    for name in ("eurosat", "dtd"):
        own = next(r for r in records if r["protocol"] == "few_shot" and r["dataset"] == name)
        target, direct = transfer["metrics"][name], own["metrics"]["test"]
        assert target["n_images"] == direct["n_images"]
        assert target["n_correct"] == direct["n_correct"] and target["accuracy"] == direct["accuracy"]
        # and both are zero-shot CLIP built for that dataset: its template, not ImageNet's
        data = build_dataset(name, transfer_root)
        labels = np.array([d.label for d in data.test])
        correct = {}
        for template_of in (name, "imagenet"):
            model = benchmark.build("zsclip", data.classnames, clip=clip, dataset=template_of)
            inputs = eval_inputs(model, cfg, torch.device("cpu"))
            logits = torch.cat(list(batch_logits(model, data.test, inputs, "fp32")))
            if template_of == name:
                # no test image is within rounding of a tie: the runs' predictions (other processes,
                # other batches) cannot differ from these, so their counts are compared exactly
                assert decisive(logits, ops=clip_ops(clip), scale=logit_scale(clip)).all()
            correct[template_of] = int((logits.argmax(dim=-1).numpy() == labels).sum())
        assert target["n_correct"] == correct[name]
        telling.append(correct[name] != correct["imagenet"])
    assert any(telling), "templates that give the same predictions test nothing"


def test_clip_adapter_classifies_a_target_with_the_targets_template(tiny_clip):
    from methods.zsclip import encode_template

    names = ["forest", "river", "annual crop land"]
    model = benchmark.build("clip_adapter", ["tench", "goldfish"], clip=tiny_clip, dataset="imagenet")
    assert model.template == dataset_template("imagenet")
    model.use_dataset(dataset_context("eurosat", names))
    with torch.no_grad():
        expected = encode_template(model.clip, dataset_template("eurosat"), names)
        wrong = encode_template(model.clip, dataset_template("imagenet"), names)
        expected = encode_template(model.clip, dataset_template("eurosat"), names, truncate=model.fast("TRUNCATE_TEXT"))
    assert model.classnames == names
    assert_close(model.text_features, expected, ops=clip_ops(tiny_clip))
    assert not torch.allclose(model.text_features, wrong)


@pytest.mark.parametrize("method", ["zsclip", "kgcoop", "tip_adapter"])
def test_methods_read_no_dataset_config(tiny_clip, method):
    """A method built for a dataset takes its template from what it is told, whatever the
    config's DATASET node says (here: another dataset)."""
    told = benchmark.build(method, ["a", "b"], clip=tiny_clip, dataset="dtd")
    cfg = benchmark.make_config(method, "oxford_pets")
    cfg.freeze()
    from methods.registry import build_method

    other = build_method(method, tiny_clip, ["a", "b"], cfg, dataset=dataset_context("dtd", ["a", "b"]))
    template = {"zsclip": "template", "kgcoop": "template", "tip_adapter": "templates"}[method]
    assert getattr(told, template) == getattr(other, template)
    assert "dtd" not in str(cfg.DATASET.NAME)


def test_methods_import_neither_the_catalogue_nor_the_toy_world():
    for path in sorted((REPO / "methods").glob("*.py")):
        for module in _imports(path):
            assert not module.startswith(("datasets.catalog", "datasets.toy", "datasets.worlds",
                                          "datasets.build")), f"{path.name} imports {module}"
        assert "cfg.DATASET" not in path.read_text(), f"{path.name} reads the config's DATASET node"


# -- one config path ---------------------------------------------------------------------------
def test_the_api_config_is_the_sweeps_config():
    from benchmark.protocols import resolve_config

    api = benchmark.make_config("mma", "imagenet", protocol="base2novel", ADAPTER_SCALE=0.01)
    sweep = resolve_config("mma", "base2novel", "imagenet", seed=1, shots=16, subsample="all", root="",
                           backbone="", opts=["TRAINER.MMADAPTER.ADAPTER_SCALE", "0.01"])
    assert api.dump() == sweep.dump()


def test_build_gives_the_precision_layout_of_a_run(tiny_clip):
    """PREC is not ignored: on a CPU every mode runs in fp32, as a run's does; the half
    layout itself comes from the same function a run uses."""
    from benchmark.precision import cast_clip, effective_precision

    model = benchmark.build("coop", ["a", "b"], clip=tiny_clip, PREC="fp16")
    assert effective_precision("fp16", torch.device("cpu")) == "fp32" and model.dtype == torch.float32
    half = cast_clip(benchmark.load_clip("tiny-clip-12"), "fp16")
    assert half.visual.conv1.weight.dtype == torch.float16 and half.ln_final.weight.dtype == torch.float32


# -- one text-feature cache, invalidated by the weights' versions -------------------------------------
@pytest.mark.parametrize("method", ["coop", "kgcoop", "mma", "maple", "promptsrc"])
def test_text_features_follow_the_weights_without_being_told(tiny_clip, method):
    """The evaluation-time text features are encoded once and kept; an in-place change of
    the learned weights (an optimiser step, a load) or new class names is seen from the
    tensors themselves: the logits equal those of a model built afresh in that state."""
    torch.manual_seed(0)
    model = benchmark.build(method, ["cat", "dog", "bird"], clip=tiny_clip)
    model.eval()
    images = torch.randn(2, 3, 32, 32)

    def fresh_logits(names):
        fresh = benchmark.build(method, names, clip=copy.deepcopy(model.clip))
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        return fresh(images)

    budget = clip_ops(model.clip)

    def close(a, b):
        rtol, atol = tolerance(b, ops=budget)
        return torch.allclose(a, b, rtol=rtol, atol=atol)

    with torch.no_grad():
        before = model(images)
        assert torch.equal(model(images), before)  # encoded once, reused: the same operations, every bit
        for p in model.trainable_parameters():  # a large in-place step of every learned tensor
            p.add_(torch.randn_like(p) * 50 * (p.abs().max() + 1))
        after = model(images)
        assert close(after, fresh_logits(["cat", "dog", "bird"])) and not close(after, before)
        model.set_classnames(["car", "tree", "house"])  # new class buffers
        renamed = model(images)
        assert close(renamed, fresh_logits(["car", "tree", "house"])) and not close(renamed, after)


# -- structure -----------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports (or a name in one), at any depth (lazy imports
    inside functions count: they run too)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # a name is a submodule or a name defined in ``base``: _graph keeps the longest
            # prefix that is a module of the project
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)  # a module's own package (its __init__) is not an edge back
        graph[name] = edges
    return graph


def test_no_import_cycle_between_the_projects_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_anothers_private_names():
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_no_file_of_the_harness_core_is_over_about_500_lines():
    sizes = {p.relative_to(REPO): len(p.read_text().splitlines()) for p in (REPO / "benchmark").rglob("*.py")}
    assert max(sizes.values()) <= 540, {str(p): n for p, n in sizes.items() if n > 540}


def test_methods_all_runs_every_registered_method(tmp_path, capsys, wide_console):
    from methods.registry import list_methods

    code = main(["--world", "synthetic", "--methods", "all", "--datasets", "eurosat", "--seeds", "1",
                 "--output", str(tmp_path / "out"), "--dry-run"])
    text = capsys.readouterr().out
    assert code == 0
    for name in list_methods():
        assert f"{name}/base2novel/eurosat/shots16/seed1" in text
