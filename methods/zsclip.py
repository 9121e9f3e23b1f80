"""Zero-shot CLIP with one hand-written prompt template per dataset.

"Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021), as
run by the official CoOp code base's zero-shot trainer: class names with "_" replaced by
spaces, put into the template of the dataset it classifies (handed over by the harness:
"a photo of a {}, a type of pet." for Oxford Pets, ...; each cross-dataset target its
own), encoded once, L2-normalised; logits are the image-text cosine similarities times
CLIP's logit scale.  Nothing trains.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from benchmark.backbone import tokenize
from methods.registry import Method, encode_tokens, register_method


@torch.no_grad()
def encode_template(clip, template: str, classnames: Sequence[str], *, truncate: bool = False) -> torch.Tensor:
    """CLIP's text features (not normalised) of the template filled with each class name
    ("_" read as a space), as the official trainers write their hand-made prompts."""
    prompts = [template.format(c.replace("_", " ")) for c in classnames]
    return encode_tokens(clip, tokenize(prompts).to(clip.logit_scale.device), truncate=truncate)


@register_method("zsclip", node="ZSCLIP", defaults=dict(PREC="fp16", TEMPLATE=""),
                 paper="Learning Transferable Visual Models From Natural Language Supervision (ICML 2021)",
                 paper_name="CLIP", code="the CoOp code base, trainers/zsclip.py")
class ZeroShotCLIP(Method):
    trainable = ()
    frozen_image_features = True

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        self.register_buffer("text_features", torch.empty(0), persistent=False)
        self.set_classnames(classnames)

    @property
    def template(self) -> str:
        """TEMPLATE when set, else the template of the dataset being classified."""
        return self.options.TEMPLATE or self.dataset.template

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.text_features = F.normalize(encode_template(self.clip, self.template, self.classnames,
                                                              truncate=self.fast("TRUNCATE_TEXT")), dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ self.text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))
