"""CoCoOp: CoOp's learned context shifted by a meta-net of each image's features.

"Conditional Prompt Learning for Vision-Language Models" (CVPR 2022, arXiv 2203.05557).
Reproduces the official trainer (``trainers/cocoop.py`` of the CoOp code base):

* the context ``ctx`` (M x width; from "a photo of a" or N(0, 0.02^2)) is shared by the
  classes; the meta-net ``linear1 (d -> d // 16) -> ReLU -> linear2 (-> width)`` maps the
  image's *normalised* image feature to one bias added to every context vector, so each
  image has its own prompts ``[SOS] ctx + pi(x) [name of c] . [EOS]``;
* logits of image i: CLIP's logit scale times its feature against the text features of
  its own prompts;
* the meta-net has torch's default Linear initialisation and, with ``PREC fp16``, is
  half precision like CLIP and the context (the official default);
* trained: the context and the meta-net (``prompt_learner``).

The official code runs the text encoder once per image in a Python loop. Here the
images' prompts go through it as one batch (in chunks of at most ``MAX_PROMPTS_PER_PASS``
sequences): every sequence is encoded independently, so the result is the loop's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from methods.coop import CoOp
from methods.coop import PromptLearner as CoOpPromptLearner
from methods.registry import Method, register_method

MAX_PROMPTS_PER_PASS = 4096


class PromptLearner(CoOpPromptLearner):
    def __init__(self, clip: nn.Module, classnames: Sequence[str], opts):
        super().__init__(clip, classnames, opts)
        vis_dim = clip.visual.output_dim
        width = clip.ln_final.weight.shape[0]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, width)),
        ]))
        if self.ctx.dtype == torch.float16:  # PREC fp16 on a GPU: CLIP and the context are half too
            self.meta_net.half()

    def image_prefix(self, image_features: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, 1 + M, width)
        """``[SOS]`` and each image's context, the positions all its class prompts share."""
        ctx = self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)
        return torch.cat([self.token_prefix[:1].expand(ctx.shape[0], -1, -1), ctx], dim=1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, n_cls, L, width)
        bias = self.meta_net(image_features).unsqueeze(1)  # (B, 1, width)
        ctx = self.ctx.unsqueeze(0) + bias  # (B, M, width)
        n_cls, batch = self.token_prefix.shape[0], ctx.shape[0]
        prefix = self.token_prefix.unsqueeze(0).expand(batch, -1, -1, -1)
        suffix = self.token_suffix.unsqueeze(0).expand(batch, -1, -1, -1)
        ctx = ctx.unsqueeze(1).expand(-1, n_cls, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2)


@register_method(
    "cocoop", node="COCOOP",
    defaults=dict(N_CTX=16, CTX_INIT="", PREC="fp16"),
    paper="Conditional Prompt Learning for Vision-Language Models (CVPR 2022)", paper_name="CoCoOp",
    code="the CoOp code base, trainers/cocoop.py")
class CoCoOp(CoOp):
    """Same learned module, official names and class-name handling as CoOp; its own prompts and forward."""

    def __init__(self, clip, classnames, cfg, dataset=None):
        Method.__init__(self, clip, classnames, cfg, dataset)
        opts = self.options.clone()
        opts.defrost()
        opts.CSC, opts.CLASS_TOKEN_POSITION = False, "end"  # CoCoOp has neither option
        self.prompt_learner = PromptLearner(clip, classnames, opts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))

    def logits_from_features(self, image: torch.Tensor) -> torch.Tensor:
        image = image / image.norm(dim=-1, keepdim=True)
        learner = self.prompt_learner
        tokens = learner.tokenized_prompts
        n_cls = tokens.shape[0]
        per_pass = max(1, MAX_PROMPTS_PER_PASS // n_cls)  # images per text-encoder pass
        prefix = learner.image_prefix(image)  # (B, 1 + M, width): [SOS] and each image's context
        text = [self.encode_shared(chunk, learner.token_suffix, tokens) for chunk in prefix.split(per_pass)]
        if any(part is None for part in text):
            prompts = learner(image)  # (B, n_cls, L, width)
            text = [self.encode_prompts(chunk.flatten(0, 1), tokens.repeat(chunk.shape[0], 1), class_tokens=tokens)
                    for chunk in prompts.split(per_pass)]
        text = torch.cat([part.view(-1, n_cls, part.shape[-1]) for part in text])
        text = text / text.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * torch.einsum("bd,bcd->bc", image, text)
