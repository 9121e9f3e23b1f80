"""``python run.py new-method NAME``: a complete small method to start from.

Three files, ready to run and to pass their tests before anything is edited:

* ``methods/NAME.py``: the method (a learned residual map on CLIP's frozen image
  feature, classified by the zero-shot text classifier), registered under NAME;
* ``methods/configs/NAME.yaml``: its hyper-parameters in the official toolbox's keys;
* ``tests/test_NAME.py``: its defining equation against a direct computation, its
  initialisation, the parameters that train, and a sweep end to end.

In the repository, files in ``methods/`` register themselves (``methods.registry``
imports every module there).  ``--into DIR`` writes a plugin instead (``DIR/NAME.py``,
``DIR/configs/NAME.yaml``, ``DIR/test_NAME.py``), used with ``--plugin NAME`` and DIR on
the Python path.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

METHOD = '''"""{title}: a learned residual map on CLIP's frozen image feature.

Made by ``python run.py new-method {name}``; replace this text with the paper (title,
venue) and where its official implementation lives, then the computation below with
the paper's.  As written:

    f'     = f + RESIDUAL_SCALE * A f          (f: CLIP's image feature, A: d x d, zero at start)
    logits = exp(logit_scale) * norm(f') @ norm(T)^T

where T holds CLIP's text features of the dataset's hand-written prompt ("a photo of a
{{}}." and its per-dataset forms), so the first logits are zero-shot CLIP's.  A does not
depend on the classes, so the method also classifies novel classes.  The harness owns
the loop (optimiser, schedule, precision, evaluation); ``trainable`` says what trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.registry import Method, register_method
from methods.zsclip import encode_template


@register_method(
    "{name}", node="{node}",
    defaults=dict(PREC="fp32", RESIDUAL_SCALE=1.0, TEMPLATE=""),
    paper="(title of the paper, venue)", paper_name="{title}",
    code="(where the official implementation lives)")
class {cls}(Method):
    trainable = ("residual.",)  # parameter-name prefixes that train; everything else stays frozen
    official_module = "residual"  # what official checkpoints hold (benchmark.load_official_checkpoint)
    frozen_image_features = True  # f is the frozen tower's output: test features are shared by runs
    config_file = Path(__file__).parent / "configs" / "{name}.yaml"

    def __init__(self, clip, classnames, cfg, dataset=None):
        # dataset: what the harness says this model classifies (name, template, world, classes)
        super().__init__(clip, classnames, cfg, dataset)
        opts = self.options  # TRAINER.{node}.*
        self.scale = float(opts.RESIDUAL_SCALE)
        dim = clip.text_projection.shape[1]
        self.residual = nn.Linear(dim, dim, bias=False).to(self.dtype)
        nn.init.zeros_(self.residual.weight)  # the initialisation rule: start as zero-shot CLIP
        self.register_buffer("text_features", torch.empty(0), persistent=False)
        self.set_classnames(classnames)

    @property
    def template(self) -> str:
        """TEMPLATE when set, else the template of the dataset being classified (the harness
        hands over each cross-dataset target's own)."""
        return self.options.TEMPLATE or self.dataset.template

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Novel classes and other datasets: only the text classifier changes."""
        self.classnames = list(classnames)
        features = encode_template(self.clip, self.template, self.classnames, truncate=self.fast("TRUNCATE_TEXT"))
        self.text_features = F.normalize(features, dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        features = features + self.scale * self.residual(features)
        return self.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ self.text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))
'''

CONFIG = '''# {title}: hyper-parameters in the official toolbox's keys.  Mark each value
# "official" (from the paper or its code) or "chosen" (ours, with the reason).
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 32  # chosen
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8

INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]

OPTIM:
  NAME: "sgd"  # chosen
  LR: 0.002  # chosen
  MAX_EPOCH: 10  # chosen
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5

MODEL:
  BACKBONE:
    NAME: "ViT-B/16"

TRAINER:
  {node}:
    PREC: "fp32"
    RESIDUAL_SCALE: 1.0  # chosen: weight of the learned residual
    TEMPLATE: ""  # "" = the dataset's hand-written prompt

# Settings for one dataset or protocol, merged on top (ImageNet, cross_dataset, few_shot_1, toy...).
VARIANTS:
  imagenet:
    OPTIM:
      MAX_EPOCH: 5  # chosen
'''

TEST = '''"""{title}: its defining equation against a direct computation on a tiny CLIP, its
initialisation, the parameters that train, and a sweep end to end on synthetic data."""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F

import benchmark
import {module}  # noqa: F401  (registers "{name}")
from benchmark.backbone import load_clip, tokenize

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]


def assert_close(actual, expected):
    """Equal up to float32 rounding through the model, relative to the logits' scale (an
    element-wise bound fails on other machines' kernels for elements near zero)."""
    bound = 1e-4 * expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= bound, (actual - expected).abs().max().item()


def _model(clip):
    torch.manual_seed(0)
    return benchmark.build("{name}", NAMES, clip=copy.deepcopy(clip), dataset="eurosat")


def test_logits_follow_the_equation():
    clip = load_clip("tiny-clip-12")
    model = _model(clip)
    torch.nn.init.normal_(model.residual.weight, std=0.05)  # away from the zero start
    images = torch.randn(4, 3, 32, 32)
    f = clip.encode_image(images)
    f = f + model.scale * f @ model.residual.weight.t()
    text = clip.encode_text(tokenize([model.template.format(n.replace("_", " ")) for n in NAMES]))
    expected = clip.logit_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(text, dim=-1).t()
    with torch.no_grad():
        assert_close(model(images), expected)


def test_starts_as_zero_shot_clip_and_trains_only_its_own_parameters():
    clip = load_clip("tiny-clip-12")
    model = _model(clip)
    zero_shot = benchmark.build("zsclip", NAMES, clip=copy.deepcopy(clip), dataset="eurosat")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(images), zero_shot(images))
    model.train()
    model.loss(model(images), torch.tensor([0, 1, 2, 0])).backward()
    trained = {{n for n, p in model.named_parameters() if p.grad is not None}}
    assert trained == {{"residual.weight"}}


def test_a_sweep_end_to_end(tmp_path):
    from benchmark.cli import main

    out = tmp_path / "out"
    code = main(["--plugin", "{module}", "--methods", "{name}", "--world", "synthetic", "--datasets", "eurosat",
                 "--seeds", "1", "--output", str(out), "--opts", "OPTIM.MAX_EPOCH", "1"])
    assert code == 0
    (record,) = (out / "records" / "{name}").rglob("*.json")
    data = json.loads(record.read_text())
    assert data["status"] == "ok" and set(data["metrics"]) == {{"base", "novel"}}
    assert "{name}" in (out / "tables" / "base2novel-synthetic.md").read_text()
'''


class ScaffoldError(ValueError):
    pass


def check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ScaffoldError(f"'{name}' cannot be a method name: use lower-case letters, digits and '_', "
                            f"starting with a letter (e.g. my_adapter).")
    from methods.registry import list_methods

    if name in list_methods():
        raise ScaffoldError(f"A method named '{name}' is already registered; choose another name.")
    return name


def new_method(name: str, into: str | Path | None = None, *, force: bool = False) -> list[Path]:
    """Write the method, its YAML and its tests; returns the paths written."""
    check_name(name)
    words = name.split("_")
    fields = dict(name=name, node=name.upper(), cls="".join(w.capitalize() for w in words),
                  title=" ".join(w.capitalize() for w in words))
    if into is None:
        fields["module"] = f"methods.{name}"
        targets = [REPO / "methods" / f"{name}.py", REPO / "methods" / "configs" / f"{name}.yaml",
                   REPO / "tests" / f"test_{name}.py"]
    else:
        fields["module"] = name
        into = Path(into)
        targets = [into / f"{name}.py", into / "configs" / f"{name}.yaml", into / f"test_{name}.py"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise ScaffoldError(f"{', '.join(existing)} already exist; pass --force to overwrite them.")
    for path, template in zip(targets, (METHOD, CONFIG, TEST)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return targets
