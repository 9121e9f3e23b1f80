"""Few-shot CLIP adaptation benchmark harness.

The Python API used from notebooks and by the tests:

    clip = benchmark.load_clip("ViT-B/16")                   # or a file path, "ViT-B-16:openai"
    model = benchmark.build("mma", classnames, clip=clip, ADAPTER_SCALE=0.1)
    logits = model(images)                                   # normalised images -> logits
    benchmark.load_official_checkpoint(model, "adapter_learner/model.pth.tar-5")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["load_clip", "build", "load_official_checkpoint", "make_config"]


def __getattr__(name: str):
    # the backbone (torch, open_clip) is imported when first used, not by every
    # ``import benchmark.<module>``: light modules (files, records) stay light
    if name == "load_clip":
        from benchmark.backbone import load_clip

        return load_clip
    raise AttributeError(f"module 'benchmark' has no attribute {name!r}")


def make_config(method: str, dataset: str = "", protocol: str = "base2novel", *, shots: int = 16, seed: int = 1,
                **overrides):
    """The resolved config of a method, unfrozen, through the same function as a sweep's
    runs (``protocols.resolve_config``: defaults < method YAML and its variants <
    overrides), so that the Python API and the command line cannot drift apart.

    Overrides use the method's own key names (``ADAPTER_SCALE=0.1``) or dotted full keys
    (``**{"OPTIM.LR": 0.01}``).
    """
    from benchmark.protocols import resolve_config
    from methods.registry import get_method

    node = get_method(method).node
    opts = []
    for key, value in overrides.items():
        full = key if "." in key else f"TRAINER.{node}.{key}"
        opts += [full, repr(value) if not isinstance(value, str) else value]
    cfg = resolve_config(method, protocol, dataset, seed=seed, shots=shots, subsample="all", root="",
                         backbone="", opts=opts, source=f"overrides for {method}")
    cfg.defrost()
    return cfg


def build(method: str, classnames: Sequence[str], clip=None, *, dataset: str = "", shots: int = 16,
          device: str | torch.device = "cpu", **overrides):
    """The method's nn.Module for these class names on ``device``, in the precision layout a
    run on that device uses (``PREC``: fp16 casts CLIP to half precision on a GPU; every
    mode runs in fp32 on a CPU).  ``clip``: a CLIP model (used as it is, cast in place when
    the precision needs it), a backbone name or file (default ViT-B/16).  ``dataset``: the
    catalogue's name of what it classifies, for its prompt template; ``shots``: training
    images per class of the run it stands for."""
    from benchmark.backbone import load_clip, resolve_device
    from benchmark.models import dataset_context, prepare_model

    if clip is None or isinstance(clip, (str, Path)):
        clip = load_clip(str(clip or "ViT-B/16"), "cpu")
    cfg = make_config(method, dataset, shots=shots, **overrides)
    cfg.freeze()
    model, _, _ = prepare_model(method, cfg, dataset_context(dataset, classnames, shots=shots),
                                device=resolve_device(device), clip=clip)
    return model


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
    import torch

    from benchmark.safe_load import UnsafeCheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except UnsafeCheckpointError:  # a ValueError naming the file and what it refers to
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a checkpoint that can be read safely: {exc}") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (expected a dict with 'state_dict').")
    model.load_official_state_dict(state)
    return {k: v for k, v in checkpoint.items() if k != "state_dict"}


def save_official_checkpoint(model, path: str | Path, epoch: int) -> Path:
    """Write the learned weights in the official checkpoint layout (readable by both)."""
    import torch

    path = Path(path)
    if hasattr(model, "save_official_file"):
        return model.save_official_file(path, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = getattr(model, model.official_module)
    torch.save({"state_dict": module.state_dict(), "epoch": epoch, "optimizer": None,
                "scheduler": None, "val_result": None}, path)
    return path

