"""The harness's own checkpoints: what a method learned, written after training.

A checkpoint holds every tensor of the method's state dict outside the frozen CLIP
(``clip.*``): learned parameters, and buffers a method fills when it trains or fits (a
cache, probe weights), plus a module's ``get_extra_state`` where it has one.  It is a
plain dict of tensors, strings and lists written with ``torch.save`` and read back with
``weights_only=True``: loading one never runs code.  Files are written to a temporary
name and renamed, so a killed run never leaves half a checkpoint.

The transfer run (ImageNet -> other datasets and domains) always writes one, so that
targets asked for later are evaluated without training again; ``--save-checkpoints``
writes one for every run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from benchmark.files import write_torch_atomic

FORMAT = "clip-fewshot-benchmark/checkpoint-1"


class CheckpointError(ValueError):
    pass


def learned_state(model: torch.nn.Module) -> dict:
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in model.state_dict().items() if not k.startswith("clip.")}


def summary(model: torch.nn.Module) -> dict:
    """What a record keeps of the learned state when no checkpoint is kept: per tensor its
    shape, dtype, a SHA-256 of its bytes (equal digests: the same tensor, bit for bit), its
    L2 norm and its largest magnitude.  Two tensors differ by at least the difference of
    their norms (L2) and of their largest magnitudes (element-wise), so ``verify`` can bound
    a difference from two summaries."""
    out = {}
    for key, value in learned_state(model).items():
        if not isinstance(value, torch.Tensor):
            continue
        data = value.contiguous()
        as_float = data.double() if (data.is_floating_point() or data.is_complex()) else data.to(torch.float64)
        out[key] = {"shape": list(data.shape), "dtype": str(data.dtype).replace("torch.", ""),
                    "sha256": hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()
                                             if data.numel() else b"").hexdigest(),
                    "l2": float(as_float.norm()) if data.numel() else 0.0,
                    "absmax": float(as_float.abs().max()) if data.numel() else 0.0}
    return out


def save(model, path: str | Path, **meta) -> Path:
    payload = {"format": FORMAT, "method": model.registry_name, "classnames": list(model.classnames),
               "state": learned_state(model), **meta}
    return write_torch_atomic(path, payload)


def load(model, path: str | Path) -> dict:
    """Restore a checkpoint written by ``save`` into a model built for the same method;
    returns its metadata.  Tensors may change shape (a cache filled by ``fit``)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint of this harness: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this harness (no format '{FORMAT}'). "
                              f"Official checkpoints load with benchmark.load_official_checkpoint.")
    if payload["method"] != model.registry_name:
        raise CheckpointError(f"{path} was written by method '{payload['method']}', not '{model.registry_name}'.")
    state = payload["state"]
    expected = set(learned_state(model))
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{path} lacks {missing[:6]} of {model.registry_name}: it was written with "
                              f"other method options.")
    device = model.clip.logit_scale.device
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if name == "_extra_state":
            module.set_extra_state(value)
        elif name in module._parameters and module._parameters[name] is not None:
            param = module._parameters[name]
            if tuple(param.shape) != tuple(value.shape):
                raise CheckpointError(f"{path}: '{key}' has shape {tuple(value.shape)}, the model "
                                      f"{tuple(param.shape)}. Build the model with the run's options.")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
        elif name in module._buffers:
            old = module._buffers[name]
            module._buffers[name] = value.to(device=device, dtype=old.dtype if old is not None and
                                             old.is_floating_point() == value.is_floating_point() else value.dtype)
        else:
            raise CheckpointError(f"{path}: '{key}' does not exist in {type(model).__name__}.")
    model.classnames = list(payload["classnames"])
    model.on_weights_loaded()
    return {k: v for k, v in payload.items() if k != "state"}
