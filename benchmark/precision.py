"""Precision as the official trainers handle it, in one place (trainer, bench, methods).

A method's ``PREC`` asks for one of:

- ``fp32``: everything in float32;
- ``fp16``: CLIP in the released model's half-precision layout (linear, convolution and
  attention weights and the projections in fp16; layer norms compute in fp32), the
  learned weights in the same dtype as what they attach to;
- ``amp``: fp32 weights, autocast to fp16 and a GradScaler for training steps,
  evaluation in fp32;
- ``bf16``: autocast to bfloat16 for training and evaluation.

On a device that is not a CUDA GPU every mode runs in fp32 (``effective_precision``);
a record stores both the requested and the effective precision.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "fp16", "amp", "bf16")


def effective_precision(requested: str, device: torch.device) -> str:
    """The precision a run uses on ``device`` for the requested ``PREC``."""
    if requested not in PRECISIONS:
        raise ValueError(f"PREC '{requested}' is not one of {', '.join(PRECISIONS)}.")
    if device.type != "cuda":
        return "fp32"  # the CPU fallback; the record stores both
    return requested


def cast_clip(clip: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``clip`` in the layout of ``precision`` (in place; fp16 is the only one that changes it)."""
    if precision == "fp16":
        from open_clip.model import convert_weights_to_lp
        from open_clip.transformer import LayerNorm, LayerNormFp32

        convert_weights_to_lp(clip, dtype=torch.float16)
        for module in clip.modules():
            if type(module) is LayerNorm:
                # the released model's layer norms compute in fp32 and cast back
                module.__class__ = LayerNormFp32
    return clip


def autocast(device: torch.device, precision: str, training: bool):
    """The autocast context of a training step (``training``) or of an evaluation."""
    if device.type == "cuda" and precision == "amp" and training:
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def grad_scaler(precision: str) -> torch.amp.GradScaler | None:
    """The GradScaler of amp training steps (none for the other modes)."""
    return torch.amp.GradScaler("cuda") if precision == "amp" else None


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward and one update, through the GradScaler under amp (as the reference trainers)."""
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
