"""A method as a run uses it: what it classifies and the model prepared for its precision.

``dataset_context`` is the hand-over to a method of what it classifies (name, template,
world, class names, shots), built from the catalogue and the world of the data root;
``prepare_model`` builds a registered method around a fresh copy of the backbone in the
precision a run uses.  The trainer, ``bench`` and the Python API (``benchmark.build``)
all go through both, so a method is the same object wherever it runs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmark import precision as P
from benchmark.backbone import clip_copy, clip_info
from datasets.catalog import CATALOG
from datasets.worlds import dataset_template
from methods.registry import DatasetContext, Method, build_method, get_method


def dataset_context(name: str, classnames: Sequence[str] = (), *, world: str = "real",
                    shots: int = 0, all_classnames: Sequence[str] = ()) -> DatasetContext:
    """What a method classifies when it classifies ``name``'s ``classnames``: the dataset's
    own template (the toy world's caption form in the toy world), whether its validation
    split is its test set, and every class name of the dataset (``all_classnames``)."""
    spec = CATALOG.get(name)
    return DatasetContext(tuple(classnames), name=name, template=dataset_template(name, world), world=world,
                          shots=int(shots), val_is_test=bool(spec is not None and spec.val_is_test),
                          all_classnames=tuple(all_classnames))


def prepare_model(method: str, cfg, dataset: DatasetContext, *, device: torch.device,
                  clip: torch.nn.Module | None = None, backbone: str | None = None) -> tuple[Method, str, str]:
    """The method built for a run: a private copy of the backbone (``clip`` or loaded from
    ``backbone``) cast to the method's effective precision on ``device``, the method built
    around it for ``dataset``.  Returns (model, requested precision, effective precision).

    The config's input size must match the backbone's (``check_input_size``)."""
    info = get_method(method)
    requested = str(cfg.TRAINER[info.node].get("PREC", "fp32"))
    effective = P.effective_precision(requested, device)
    if clip is None:
        clip = clip_copy(backbone)
    clip = P.cast_clip(clip, effective)
    model = build_method(method, clip, list(dataset.classnames), cfg, dataset=dataset).to(device)
    return model, requested, effective


def input_size(clip: torch.nn.Module) -> tuple[int, int]:
    """The image size the backbone takes (the official trainers assert the config's matches)."""
    size = clip_info(clip)["image_size"]
    return (size, size)
