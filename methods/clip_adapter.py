"""CLIP-Adapter: a residual bottleneck on CLIP's image feature.

"CLIP-Adapter: Better Vision-Language Models with Feature Adapters" (IJCV 2023,
arXiv 2110.04544).  Reproduces the official trainer (``clip_adapter.py`` of the
authors' repository, a trainer for the CoOp code base):

* the image feature f (CLIP's projected output, not normalised) goes through
  ``fc``: Linear(d -> d/4, no bias), ReLU, Linear(d/4 -> d, no bias), ReLU; the
  feature used is ``RATIO * adapter(f) + (1 - RATIO) * f`` with RATIO 0.2;
* text classifier: the dataset's hand-written template ("a photo of a {}, a type of
  pet.", ... as the zero-shot trainer) through the frozen CLIP text encoder;
* logits: both L2-normalised after the mixing, times CLIP's logit scale;
* CLIP is cast to fp32 (``PREC fp32``); the adapter has torch's default Linear
  initialisation and trains alone.

The official code hard-codes d = 1024 (the RN50 backbone); here d is the backbone's
output dimension (512 for ViT-B/16), so the same layer serves any CLIP.  The official
code also re-encodes the class prompts at every step; the frozen text encoder gives the
same features, so they are encoded once per class set.

The learned module is ``adapter`` (registered as ``clip_adapter`` by the official
trainer, so files sit in ``clip_adapter/model.pth.tar-N``), with the keys
``fc.0.weight`` and ``fc.2.weight``; it does not depend on the classes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from methods.registry import Method, register_method
from methods.zsclip import encode_template


class Adapter(nn.Module):
    """The official bottleneck: two bias-free linear layers, each followed by a ReLU."""

    def __init__(self, c_in: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(c_in, c_in // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(c_in // reduction, c_in, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_method(
    "clip_adapter", node="CLIP_ADAPTER",
    defaults=dict(RATIO=0.2, REDUCTION=4, PREC="fp32", TEMPLATE=""),
    paper="CLIP-Adapter: Better Vision-Language Models with Feature Adapters (IJCV 2023)",
    paper_name="CLIP-Adapter", code="the authors' CLIP-Adapter repository, clip_adapter.py")
class CLIPAdapter(Method):
    trainable = ("adapter.",)
    official_module = "adapter"
    frozen_image_features = True

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        self.ratio = float(self.options.RATIO)
        self.adapter = Adapter(clip.visual.output_dim, int(self.options.REDUCTION)).to(self.dtype)
        self.register_buffer("text_features", torch.empty(0), persistent=False)
        self.set_classnames(classnames)

    @property
    def template(self) -> str:
        """TEMPLATE when set, else the template of the dataset being classified."""
        return self.options.TEMPLATE or self.dataset.template

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.text_features = encode_template(self.clip, self.template, self.classnames,
                                             truncate=self.fast("TRUNCATE_TEXT"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))

    def logits_from_features(self, image: torch.Tensor) -> torch.Tensor:
        image = self.ratio * self.adapter(image) + (1 - self.ratio) * image
        image = image / image.norm(dim=-1, keepdim=True)
        text = self.text_features / self.text_features.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image @ text.t()
