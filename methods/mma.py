"""MMA: Multi-Modal Adapter for vision-language models.

"MMA: Multi-Modal Adapter for Vision-Language Models" (CVPR 2024).  Reproduces the
official trainer (``trainers/mmadapter.py`` and its modified CLIP blocks):

* The text input is the fixed prompt "a photo of a {class}." (``TEXT_CTX_INIT``), embedded
  once with CLIP's token embedding.
* Adapters sit on layers ``ADAPTER_START..ADAPTER_END`` (inclusive) of BOTH encoders.
  Index 0 is before the transformer (text: the token embeddings; image: after ``ln_pre``);
  index i >= 1 is residual block i.  In block i the adapter reads the block's *input*
  through the block's own ``ln_1``, then ``down`` (d -> DIM, ReLU), the shared module of
  that layer (DIM -> DIM, ReLU; one module per layer, used by both towers), ``up``
  (DIM -> d), times ``ADAPTER_SCALE``, and is added after the MLP residual.
* Gradient scaling: the branch input passes an op that scales the gradient by SCALE and
  the branch output one that scales it by 1/SCALE.  The backbone's gradients are
  therefore unchanged, while every adapter weight gets 1/SCALE times its true gradient
  (with SCALE = 0.001 this is what makes lr 0.0015 work).
* Kaiming-normal (fan_out, relu) weights and zero biases, built text, visual, shared.
* Precision: amp (autocast + GradScaler) for training; evaluation runs in fp32 without
  autocast.  Text features are computed once per class set at evaluation.

Switches for the paper's ablations (the defaults are the official computation, bit for
bit; at their defaults they are not part of a run's identity, so records made before
they existed stay valid): ``SHARED`` False drops the shared projection (each adapter is
down -> ReLU -> up, and the state dict has no ``shared_adapter`` keys); ``TOWERS`` ``text``
or ``image`` keeps the adapters of one encoder only (the other is CLIP's own tower; the
shared projection, if on, serves the adapted one).  ``ADAPTER_START``/``ADAPTER_END`` (the
first and last adapted layers), ``ADAPTER_SCALE`` (alpha) and ``ADAPTER_DIM`` (the
bottleneck width) are the official options.

The learned module is ``adapter_learner`` with the official parameter names
(``text_adapter.5.down.0.weight``, ``shared_adapter.5.0.weight``...), so official
checkpoints load directly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, grad_scale, register_method


TOWERS = ("both", "text", "image")


def _build_adapters(d_model: int, n_layers: int, start: int, end: int, dim: int, *,
                    on: bool = True) -> nn.ModuleList:
    """One adapter per layer index 0..n_layers; None outside start..end (everywhere when not ``on``)."""
    layers: list[nn.Module | None] = [None] * (n_layers + 1)
    for i in range(start, end + 1) if on else ():
        if dim == d_model:  # the shared adapters (DIM -> DIM) take this form
            layers[i] = nn.Sequential(nn.Linear(d_model, dim), nn.ReLU())
        else:
            layers[i] = nn.Sequential(OrderedDict([
                ("down", nn.Sequential(nn.Linear(d_model, dim), nn.ReLU())),
                ("up", nn.Linear(dim, d_model)),
            ]))
    adapters = nn.ModuleList(layers)
    for m in adapters.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
    return adapters


class AdapterLearner(nn.Module):
    """The learned part, with the official module and parameter names."""

    def __init__(self, clip: nn.Module, classnames: Sequence[str], opts):
        super().__init__()
        self.text_ctx_init = str(opts.TEXT_CTX_INIT)
        self.scale = float(opts.ADAPTER_SCALE)
        n_text, n_visual = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
        start, end, dim = int(opts.ADAPTER_START), int(opts.ADAPTER_END), int(opts.ADAPTER_DIM)
        towers, shared = str(opts.get("TOWERS", "both")), bool(opts.get("SHARED", True))
        if towers not in TOWERS:
            raise ValueError(f"TRAINER.MMADAPTER.TOWERS is '{towers}'; use both (the paper's MMA: adapters on "
                             f"both encoders), text or image (one encoder only).")
        text_on, visual_on = towers in ("both", "text"), towers in ("both", "image")
        # the first text block with an adapter (beyond the last block when the text tower has none):
        # the text blocks below it are frozen (the FROZEN_TEXT fast path)
        self.start = start
        self.text_start = start if text_on else n_text + 1
        if not 0 <= start <= end <= min(n_text, n_visual):
            raise ValueError(f"MMA adapter layers {start}..{end} do not fit a backbone with "
                             f"{n_text} text and {n_visual} image blocks; set "
                             f"TRAINER.MMADAPTER.ADAPTER_START/END within 0..{min(n_text, n_visual)}.")
        widths = (clip.ln_final.weight.shape[0], clip.visual.ln_post.weight.shape[0])
        if dim in widths:
            # the official code would build the shared form (no down/up) and fail at forward
            raise ValueError(f"MMA's ADAPTER_DIM ({dim}) must differ from the encoder widths {widths}.")
        self.register_buffer("token_embedding", torch.empty(0), persistent=True)
        self.register_buffer("tokenized_prompts", torch.empty(0, dtype=torch.long), persistent=True)
        self.embed_classnames(clip, classnames)
        # construction order as the official code: text, visual, shared (the RNG draws follow it;
        # a tower switched off draws nothing)
        self.text_adapter = _build_adapters(clip.ln_final.weight.shape[0], n_text, start, end, dim, on=text_on)
        self.visual_adapter = _build_adapters(clip.visual.ln_post.weight.shape[0], n_visual, start, end, dim,
                                              on=visual_on)
        self.shared_adapter = _build_adapters(dim, n_visual, start, end, dim) if shared else None
        if clip.visual.conv1.weight.dtype == torch.float16:  # official: adapters follow CLIP's dtype
            self.half()

    @torch.no_grad()
    def embed_classnames(self, clip: nn.Module, classnames: Sequence[str]) -> None:
        names = [name.replace("_", " ") for name in classnames]
        prompts = [f"{self.text_ctx_init} {name}." for name in names]
        tokens = tokenize(prompts).to(clip.token_embedding.weight.device)
        self.token_embedding = clip.token_embedding(tokens).to(clip.visual.conv1.weight.dtype)
        self.tokenized_prompts = tokens

    def branch(self, tower: str, index: int, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor | None:
        """The adapter output of layer ``index`` for block input ``x`` (None if no adapter)."""
        adapter = (self.text_adapter if tower == "text" else self.visual_adapter)[index]
        if adapter is None:
            return None
        shared = self.shared_adapter[index] if self.shared_adapter is not None else None
        if norm is not None:  # blocks: gradient-scaled input through the block's own ln_1
            y = norm(grad_scale(x, self.scale))
        else:  # index 0: x is already what the adapter reads
            y = x
        y = adapter.down(y)
        if shared is not None:
            y = shared(y)
        y = adapter.up(y) * self.scale
        return grad_scale(y, 1.0 / self.scale) if norm is not None else y


@register_method(
    "mma", node="MMADAPTER",
    defaults=dict(TEXT_CTX_INIT="a photo of a", PREC="amp", ADAPTER_START=5, ADAPTER_END=12,
                  ADAPTER_DIM=32, ADAPTER_SCALE=0.001,
                  SHARED=True,  # the shared projection between the towers' adapters (False: none)
                  TOWERS="both"),  # which encoders carry adapters: both, text or image
    neutral=dict(SHARED=True, TOWERS="both"),  # added for the ablations; the official computation
    paper="MMA: Multi-Modal Adapter for Vision-Language Models (CVPR 2024)", paper_name="MMA",
    code="the authors' Multi-Modal-Adapter repository, trainers/mmadapter.py")
class MMA(Method):
    trainable = ("adapter_learner.",)
    official_module = "adapter_learner"
    official_ignore = ("token_embedding", "tokenized_prompts")

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        self.adapter_learner = AdapterLearner(clip, classnames, self.options)
        self._frozen_text: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    # -- class names -------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.adapter_learner.embed_classnames(self.clip, classnames)

    # -- encoders ----------------------------------------------------------------
    def _run_blocks(self, tower: str, blocks, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        learner = self.adapter_learner
        first = 1
        if tower == "text" and learner.text_start >= 2 and self.fast("FROZEN_TEXT"):
            # the prompt is fixed and no adapter acts below block `text_start`: those blocks'
            # output is the same at every step
            x = self._frozen_text_prefix(blocks[:learner.text_start - 1], x, attn_mask)
            first = learner.text_start
        for index in range(first, len(blocks) + 1):
            block = blocks[index - 1]
            y = learner.branch(tower, index, x, block.ln_1)
            x = block(x, attn_mask=attn_mask)
            if y is not None:
                x = x + y
        return x

    @torch.no_grad()
    def _frozen_text_prefix(self, blocks, x: torch.Tensor, attn_mask) -> torch.Tensor:
        """The output of the frozen text blocks below the first adapter, computed once per
        class set, input length, precision and device (the FROZEN_TEXT fast path)."""
        kind = x.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        # the prompt embeddings by identity and version: new class names or a loaded
        # checkpoint replace or rewrite them
        prompts = self.adapter_learner.token_embedding
        key = (tuple(x.shape), x.dtype, x.device, autocast, id(prompts), prompts._version)
        if self._frozen_text is None or self._frozen_text[0] != key or self._frozen_text[2] is not prompts:
            for block in blocks:
                x = block(x, attn_mask=attn_mask)
            self._frozen_text = (key, x, prompts)
        return self._frozen_text[1]

    def encode_text(self) -> torch.Tensor:
        learner = self.adapter_learner
        x = learner.token_embedding
        y = learner.branch("text", 0, x, None)
        if y is not None:
            x = x + y
        return self.encode_prompts(x, learner.tokenized_prompts,
                                   lambda blocks, h, mask: self._run_blocks("text", blocks, h, mask))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = visual.conv1(images.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                               dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        normed = visual.ln_pre(x)
        y = self.adapter_learner.branch("visual", 0, normed, None)
        x = normed if y is None else normed + y
        x = self._run_blocks("visual", visual.transformer.resblocks, x)
        x = visual.ln_post(x[:, 0, :])
        return x @ visual.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = F.normalize(self.prompt_features(), dim=-1)
        image = F.normalize(self.encode_image(images), dim=-1)
        return self.clip.logit_scale.exp() * image @ text.t()
