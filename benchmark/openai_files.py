"""OpenAI-format CLIP files: reading one into an open_clip ``CLIP`` and writing one.

OpenAI distributes CLIP as TorchScript archives (``ViT-B-16.pt``); some copies are plain
state dicts with OpenAI's key names.  Both are read weights-only (a checkpoint must not run
code), and the architecture is read from the tensors' shapes.  ``save_openai_checkpoint``
writes either form from an open_clip model of OpenAI's architecture (tests use it to
make small OpenAI-format files).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from benchmark.files import write_atomic

# OpenAI's TorchScript archives carry these as tensors next to the weights; they are
# derived from the weights' shapes, so loaders drop them.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")

# OpenAI files do not record head counts; OpenAI's own builder assumes 64-wide heads.
# Widths below 64 (tiny test models only) get a single head.
OPENAI_HEAD_WIDTH = 64


class BackboneError(Exception):
    """A backbone spec that cannot be resolved or a file that is not a usable CLIP checkpoint
    (raised here and by ``benchmark.backbone``)."""


# -- reading -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # OpenAI's released weights are TorchScript archives, so we keep using torch.jit
    # despite its deprecation warnings.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads an OpenAI-format checkpoint into a plain ``{key: tensor}`` dict with OpenAI's keys."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"Checkpoint file {path} does not exist.")
    try:
        if is_torchscript(path):
            with _quiet_jit():
                obj: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            # weights_only: a checkpoint is data, it must not run code when read
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise BackboneError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Expected OpenAI's CLIP file (a TorchScript archive such as ViT-B-16.pt) or a state dict "
            "with OpenAI's key names saved with torch.save."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BackboneError(
            f"{path} holds a {type(obj).__name__}, not a state dict; expected OpenAI's CLIP checkpoint."
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise BackboneError(f"{path} holds no tensors; expected OpenAI's CLIP checkpoint.")
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    for key in OPENAI_META_KEYS:
        sd.pop(key, None)
    # older open_clip versions stored the causal mask; it is rebuilt from context_length
    sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
    return sd


def _layer_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _heads(width: int) -> int:
    return max(1, width // OPENAI_HEAD_WIDTH)


def build_from_state_dict(sd: dict[str, torch.Tensor], where: str) -> CLIP:
    """Builds an fp32 open_clip CLIP whose architecture is read from OpenAI checkpoint shapes.

    Mirrors open_clip's ``build_model_from_openai_state_dict`` but keeps fp32 (loading fp16
    values into fp32 parameters is exact), infers the MLP ratio and gives widths below 64 one
    head, so tiny test models round-trip too.
    """
    common = ["positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
              "ln_final.weight", "transformer.resblocks.0.mlp.c_fc.weight"]
    vit = "visual.proj" in sd or ("visual.conv1.weight" in sd and "visual.class_embedding" in sd)
    if vit:
        required = common + ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                             "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    else:
        required = common + ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"]
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:6])
        raise BackboneError(
            f"{where} does not look like an OpenAI CLIP checkpoint: missing {', '.join(missing)} "
            f"(it has {len(sd)} tensors, e.g. {sample}). Pass OpenAI's file or one written by save_openai_checkpoint."
        )
    try:
        if vit:
            vision_width = sd["visual.conv1.weight"].shape[0]
            patch_size = sd["visual.conv1.weight"].shape[-1]
            n_pos = sd["visual.positional_embedding"].shape[0]
            grid = round((n_pos - 1) ** 0.5)
            if grid * grid + 1 != n_pos:
                raise BackboneError(f"{where}: visual.positional_embedding has {n_pos} rows, not a square grid plus one.")
            vision_cfg = CLIPVisionCfg(
                layers=_layer_count(sd, "visual.transformer.resblocks."),
                width=vision_width,
                head_width=vision_width // _heads(vision_width),
                mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width,
                patch_size=patch_size,
                image_size=patch_size * grid,
            )
        else:
            n_pos = sd["visual.attnpool.positional_embedding"].shape[0]
            out_width = round((n_pos - 1) ** 0.5)
            vision_cfg = CLIPVisionCfg(
                layers=tuple(_layer_count(sd, f"visual.layer{b}.") for b in (1, 2, 3, 4)),
                width=sd["visual.layer1.0.conv1.weight"].shape[0],
                image_size=out_width * 32,
            )
        text_width = sd["ln_final.weight"].shape[0]
        text_cfg = CLIPTextCfg(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=text_width,
            heads=_heads(text_width),
            layers=_layer_count(sd, "transformer.resblocks."),
            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        )
        # the random init below is overwritten; fork so that loading never moves the caller's RNG
        with torch.random.fork_rng(devices=[]):
            model = CLIP(
                embed_dim=sd["text_projection"].shape[1],
                vision_cfg=vision_cfg,
                text_cfg=text_cfg,
                quick_gelu=True,  # OpenAI trained with QuickGELU; plain GELU shifts every feature
                cast_dtype=None,
            )
        if model.logit_scale.ndim != sd["logit_scale"].ndim:
            sd = dict(sd, logit_scale=sd["logit_scale"].reshape(model.logit_scale.shape))
        result = model.load_state_dict(sd, strict=False)
    except BackboneError:
        raise
    except Exception as e:  # size mismatches, odd shapes
        raise BackboneError(
            f"{where} has OpenAI-like keys but its tensors do not fit a CLIP architecture "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})."
        ) from e
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} key(s) such as {', '.join(result.missing_keys[:5])}")
        if result.unexpected_keys:
            parts.append(
                f"{len(result.unexpected_keys)} unexpected key(s) such as {', '.join(result.unexpected_keys[:5])}"
            )
        raise BackboneError(
            f"{where} does not match OpenAI's CLIP key set: {'; '.join(parts)}. "
            "Pass OpenAI's file or one written by save_openai_checkpoint."
        )
    return model.float().eval()


# -- writing -----------------------------------------------------------------------------------

class _KeyTree(nn.Module):
    """An empty module; nested copies hold tensors under exactly OpenAI's dotted key names."""


def _openai_incompatibilities(model: CLIP) -> list[str]:
    """What in an open_clip CLIP an OpenAI-format file cannot express."""
    problems = []
    if getattr(model, "logit_bias", None) is not None:
        problems.append("it has a logit_bias (SigLIP-style)")
    if not isinstance(model.text_projection, nn.Parameter):
        problems.append("its text projection is a Linear layer, not a matrix")
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        problems.append(f"its text pooling is {model.text_pool_type!r}, not argmax at EOT")
    if model.attn_mask is None:
        problems.append("its text tower has no causal mask")
    towers = [("text", model.transformer)]
    if isinstance(model.visual, VisionTransformer):
        towers.append(("vision", model.visual.transformer))
        if getattr(model.visual, "pool_type", "tok") != "tok" or getattr(model.visual, "attn_pool", None) is not None:
            problems.append("its image tower does not pool the class token")
        if getattr(model.visual, "final_ln_after_pool", False):
            problems.append("its image tower applies ln_post after pooling")
    for tower, transformer in towers:
        block = transformer.resblocks[0]
        if not isinstance(getattr(block.mlp, "gelu", None), QuickGELU):
            problems.append(f"its {tower} tower uses {type(block.mlp.gelu).__name__}, OpenAI files imply QuickGELU")
        heads = block.attn.num_heads
        if heads != _heads(transformer.width):
            problems.append(
                f"its {tower} tower has {heads} head(s) but an OpenAI file cannot record heads and loaders assume "
                f"{_heads(transformer.width)} for width {transformer.width}"
            )
    return problems


def save_openai_checkpoint(model: CLIP, path: str | os.PathLike, *, torchscript: bool = False) -> None:
    """Writes an open_clip CLIP with OpenAI's architecture as an OpenAI-format file.

    torchscript=False writes a plain state dict with OpenAI's key names; True writes a
    TorchScript archive whose ``state_dict()`` has those keys (and OpenAI's
    input_resolution / context_length / vocab_size entries), like OpenAI's released files.
    Tensors keep the model's dtype, so the file loads back bit-identical. The causal
    attention mask is not written: it is a non-persistent buffer rebuilt from
    context_length, and OpenAI's files do not carry it either.
    """
    if type(model) is not CLIP:
        raise BackboneError(f"save_openai_checkpoint needs an open_clip CLIP, got {type(model).__name__}.")
    problems = _openai_incompatibilities(model)
    if problems:
        raise BackboneError("This model cannot be written as an OpenAI-format file: " + "; ".join(problems) + ".")
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    # prove the file will load back into the same architecture before writing it
    build_from_state_dict(dict(sd), "the model to save")
    path = Path(path)
    if not torchscript:
        write_atomic(path, lambda tmp: torch.save(sd, tmp))
        return
    root = _KeyTree()
    entries = dict(sd)
    entries.update(
        input_resolution=torch.tensor(int(torch.tensor(model.visual.image_size).flatten()[0])),
        context_length=torch.tensor(model.context_length),
        vocab_size=torch.tensor(model.token_embedding.num_embeddings),
    )
    for key, tensor in entries.items():
        *parents, leaf = key.split(".")
        node: nn.Module = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, _KeyTree())
            node = node._modules[part]
        if tensor.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
        else:
            node.register_buffer(leaf, tensor)
    with _quiet_jit():
        scripted = torch.jit.script(root)
        write_atomic(path, lambda tmp: torch.jit.save(scripted, tmp))
