"""CLIP's features layer by layer: the pooled token of each tower at every depth.

For each tower the points are X_Embed (the input of the first transformer block), the
output of every block, and X_Proj (the tower's final output, exactly what
``clip.encode_image`` / ``clip.encode_text`` return and the methods use).  The pooled
token is the one the tower's own head reads:

- image tower: the class token (``pool_type="tok"``, every OpenAI ViT) or the mean of the
  patch tokens (``pool_type="avg"``); X_Embed is after the positional embedding and
  ``ln_pre``;
- text tower: the end-of-text token, found by open_clip's own ``text_global_pool`` rule;
  X_Embed is the token embedding plus the positional embedding.

The features come from forward hooks on the model's own blocks while ``encode_image`` /
``encode_text`` run, so the last point is the model's output itself, not a re-computation.
"""

from __future__ import annotations

from typing import Callable

import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

EMBED, PROJ = "X_Embed", "X_Proj"


def point_names(depth: int) -> list[str]:
    """The points of a tower with ``depth`` blocks: X_Embed, "1" ... str(depth), X_Proj."""
    return [EMBED, *(str(i) for i in range(1, depth + 1)), PROJ]


def tower_depths(clip: CLIP) -> dict[str, int]:
    """Blocks of each tower; a backbone without a transformer image tower is refused."""
    if not isinstance(clip.visual, VisionTransformer):
        raise ValueError(f"The layer analysis needs a transformer image tower (a ViT); this backbone's is a "
                         f"{type(clip.visual).__name__}. Choose a ViT backbone with --clip (e.g. ViT-B/16).")
    return {"image": len(clip.visual.transformer.resblocks), "text": len(clip.transformer.resblocks)}


def _collect(transformer: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor],
             run: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """``pool`` of the input of the first block and of every block's output while ``run``
    executes, then ``run``'s own result: one (batch, width) tensor per point."""
    batch_first = getattr(transformer, "batch_first", True)

    def nld(x: torch.Tensor) -> torch.Tensor:
        return x if batch_first else x.transpose(0, 1)

    points: list[torch.Tensor] = []
    blocks = transformer.resblocks
    handles = [blocks[0].register_forward_pre_hook(lambda _m, args: points.append(pool(nld(args[0]))))]
    handles += [block.register_forward_hook(lambda _m, _args, out: points.append(pool(nld(out)))) for block in blocks]
    try:
        final = run()
    finally:
        for handle in handles:
            handle.remove()
    if len(points) != len(blocks) + 1:
        raise RuntimeError(f"expected {len(blocks) + 1} hooked points, got {len(points)}: the tower did not run "
                           "its blocks once each")
    return points + [final]


def image_points(clip: CLIP, images: torch.Tensor) -> list[torch.Tensor]:
    """The pooled image token at every point of the image tower (X_Embed, blocks, X_Proj)."""
    tower_depths(clip)
    pool_type = getattr(clip.visual, "pool_type", "tok")
    if pool_type == "tok":
        def pool(x):
            return x[:, 0]
    elif pool_type == "avg":
        def pool(x):
            return x[:, 1:].mean(dim=1) if getattr(clip.visual, "class_embedding", None) is not None else x.mean(1)
    else:
        raise ValueError(f"Image tower pooling {pool_type!r} has no single token per layer; the analysis "
                         "supports class-token ('tok') and average ('avg') pooling.")
    with torch.no_grad():
        return _collect(clip.visual.transformer, pool, lambda: clip.encode_image(images))


def text_points(clip: CLIP, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The end-of-text token's feature at every point of the text tower (X_Embed, blocks, X_Proj)."""
    pool_type = getattr(clip, "text_pool_type", "argmax")
    eos = getattr(clip, "text_eos_id", None)
    if pool_type not in ("argmax", "eos", "first", "last"):
        raise ValueError(f"Text tower pooling {pool_type!r} has no single token per layer; the analysis supports "
                         "end-of-text ('argmax', 'eos'), 'first' and 'last' pooling.")

    def pool(x):
        return text_global_pool(x, tokens, pool_type, eos_token_id=eos)

    with torch.no_grad():
        return _collect(clip.transformer, pool, lambda: clip.encode_text(tokens))
