"""Few-shot CLIP adaptation benchmark harness.

The Python API used from notebooks and by the tests:

    clip = benchmark.load_clip("ViT-B/16")                   # or a file path, "ViT-B-16:openai"
    model = benchmark.build("mma", classnames, clip=clip, ADAPTER_SCALE=0.1)
    logits = model(images)                                   # normalised images -> logits
    benchmark.load_official_checkpoint(model, "adapter_learner/model.pth.tar-5")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from benchmark.backbone import load_clip

__all__ = ["load_clip", "build", "load_official_checkpoint", "make_config"]


def make_config(method: str, dataset: str = "", protocol: str = "base2novel", **overrides):
    """The resolved config of a method (defaults < method YAML < overrides), unfrozen.

    Overrides use the method's own key names (``ADAPTER_SCALE=0.1``) or dotted full keys
    (``**{"OPTIM.LR": 0.01}``).
    """
    from benchmark import config as C
    from benchmark.protocols import method_yaml
    from methods.registry import add_method_defaults, get_method

    info = get_method(method)
    cfg = C.get_cfg_default()
    add_method_defaults(cfg)
    C.merge_dict(cfg, method_yaml(method, [protocol, dataset]), f"methods/configs/{method}.yaml")
    cfg.DATASET.NAME = dataset
    cfg.TRAINER.NAME = info.node
    opts = []
    for key, value in overrides.items():
        full = key if "." in key else f"TRAINER.{info.node}.{key}"
        opts += [full, repr(value) if not isinstance(value, str) else value]
    C.merge_opts(cfg, opts, source=f"overrides for {method}")
    return cfg


def build(method: str, classnames: Sequence[str], clip=None, *, dataset: str = "",
          device: str | torch.device = "cpu", **overrides):
    """The method's nn.Module for these class names (fp32, on ``device``)."""
    from methods.registry import build_method

    if clip is None or isinstance(clip, (str, Path)):
        clip = load_clip(str(clip or "ViT-B/16"), "cpu")
    cfg = make_config(method, dataset, **overrides)
    cfg.freeze()
    return build_method(method, clip, classnames, cfg).to(device)


def load_official_checkpoint(model, path: str | Path) -> dict:
    """Load a checkpoint written by the method's official implementation into ``model``.

    The file is the reference toolbox's ``<registered name>/model.pth.tar-N`` (or
    ``model-best.pth.tar``): a dict whose ``state_dict`` holds the official parameter
    names.  It is read weights-only, or, when it holds pickled scheduler objects (runs
    with a warm-up), through a restricted unpickler (``benchmark.safe_load``).  Class-dependent buffers are dropped and rebuilt for the model's class names.
    Returns the checkpoint's other fields (epoch, ...).
    """
    path = Path(path)
    if hasattr(model, "load_official_file"):  # official files that are not a state dict (Tip-Adapter's cache)
        return model.load_official_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Official runs write it as "
                                f"<output>/<registered name>/model.pth.tar-<epoch>.")
    from benchmark.safe_load import load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a checkpoint that can be read safely: {exc}") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (expected a dict with 'state_dict').")
    model.load_official_state_dict(state)
    return {k: v for k, v in checkpoint.items() if k != "state_dict"}


def save_official_checkpoint(model, path: str | Path, epoch: int) -> Path:
    """Write the learned weights in the official checkpoint layout (readable by both)."""
    path = Path(path)
    if hasattr(model, "save_official_file"):
        return model.save_official_file(path, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = getattr(model, model.official_module)
    torch.save({"state_dict": module.state_dict(), "epoch": epoch, "optimizer": None,
                "scheduler": None, "val_result": None}, path)
    return path

