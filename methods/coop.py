"""CoOp: one learned context shared by every class name.

"Learning to Prompt for Vision-Language Models" (IJCV 2022, arXiv 2109.01134).
Reproduces the official trainer (``trainers/coop.py`` of the CoOp code base):

* the prompt of class c is ``[SOS] ctx_1 .. ctx_M [name of c] . [EOS]``: the context
  vectors replace the embeddings of M placeholder words; with ``CTX_INIT`` ("a photo of
  a") they start as those words' token embeddings and M is their number, otherwise they
  are drawn from N(0, 0.02^2), one set for all classes or one per class (``CSC``);
* the class name goes at the end, in the middle (context split in halves) or at the front
  (``CLASS_TOKEN_POSITION``);
* frozen CLIP; logits are CLIP's cosine similarities times its logit scale;
* precision: ``fp16`` keeps CLIP *and* the context in half precision and lets SGD update
  the fp16 tensor directly (the official default); ``fp32``/``amp`` use fp32 weights.

The learned module is ``prompt_learner`` (``ctx``, plus the class-dependent buffers
``token_prefix``/``token_suffix`` that official checkpoints carry and loading drops).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, register_method


def _name_lengths(names: Sequence[str]) -> list[int]:
    # tokens of each name alone: the rows between SOS and EOS of its tokenisation
    tokens = tokenize(list(names))
    return [int(t.argmax()) - 1 for t in tokens]


class PromptLearner(nn.Module):
    def __init__(self, clip: nn.Module, classnames: Sequence[str], opts):
        super().__init__()
        dtype = clip.visual.conv1.weight.dtype
        width = clip.ln_final.weight.shape[0]
        ctx_init = str(opts.CTX_INIT)
        self.position = str(opts.CLASS_TOKEN_POSITION)
        if self.position not in ("end", "middle", "front"):
            raise ValueError(f"CLASS_TOKEN_POSITION must be end, middle or front, not '{self.position}'.")
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            n_ctx = len(ctx_init.split(" "))
            with torch.no_grad():
                embedding = clip.token_embedding(tokenize([ctx_init])).to(dtype)
            ctx = embedding[0, 1:1 + n_ctx, :].clone()
            self.prefix_text = ctx_init
        else:
            n_ctx = int(opts.N_CTX)
            shape = (len(classnames), n_ctx, width) if opts.CSC else (n_ctx, width)
            ctx = torch.empty(*shape, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("token_prefix", torch.empty(0))
        self.register_buffer("token_suffix", torch.empty(0))
        self.embed_classnames(clip, classnames)

    @torch.no_grad()
    def embed_classnames(self, clip: nn.Module, classnames: Sequence[str]) -> None:
        if self.ctx.dim() == 3 and self.ctx.shape[0] != len(classnames):
            raise ValueError(f"Class-specific contexts were learned for {self.ctx.shape[0]} classes and "
                             f"cannot serve {len(classnames)} others (the official code fails here too).")
        names = [name.replace("_", " ") for name in classnames]
        self.name_lens = _name_lengths(names)
        tokens = tokenize([f"{self.prefix_text} {name}." for name in names]).to(self.ctx.device)
        embedding = clip.token_embedding(tokens).to(self.ctx.dtype)
        self.token_prefix = embedding[:, :1, :]  # SOS
        self.token_suffix = embedding[:, 1 + self.n_ctx:, :]  # class name, ".", EOS, padding
        self.tokenized_prompts = tokens

    def shared_prefix(self) -> torch.Tensor | None:
        """``[SOS] ctx_1 .. ctx_M``, the first positions of every class's prompt, as one
        ``(1, M + 1, width)`` prompt; None where the prompts differ there (one context per
        class, or the class name before or inside the context)."""
        if self.position != "end" or self.ctx.dim() == 3:
            return None
        return torch.cat([self.token_prefix[:1], self.ctx.unsqueeze(0)], dim=1)

    def forward(self) -> torch.Tensor:
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        prompts = []
        for i, length in enumerate(self.name_lens):
            name, rest = suffix[i:i + 1, :length], suffix[i:i + 1, length:]
            if self.position == "middle":
                parts = [prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest]
            else:  # front
                parts = [prefix[i:i + 1], name, ctx[i:i + 1], rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0)


def encode_learned_prompts(method: Method, learner: PromptLearner) -> torch.Tensor:
    """The text features of ``learner``'s prompts for ``method``: through the SHARED_PREFIX
    fast path where every class's prompt starts with the same positions, else whole."""
    prefix = learner.shared_prefix()
    if prefix is not None:
        features = method.encode_shared(prefix, learner.token_suffix, learner.tokenized_prompts)
        if features is not None:
            return features
    return method.encode_prompts(learner(), learner.tokenized_prompts)


@register_method(
    "coop", node="COOP",
    defaults=dict(N_CTX=16, CSC=False, CTX_INIT="", PREC="fp16", CLASS_TOKEN_POSITION="end"),
    paper="Learning to Prompt for Vision-Language Models (IJCV 2022)", paper_name="CoOp",
    code="the CoOp code base, trainers/coop.py")
class CoOp(Method):
    trainable = ("prompt_learner.",)
    official_module = "prompt_learner"
    official_ignore = ("token_prefix", "token_suffix")
    frozen_image_features = True

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        self.prompt_learner = PromptLearner(clip, classnames, self.options)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.prompt_learner.embed_classnames(self.clip, classnames)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))

    def encode_text(self) -> torch.Tensor:
        return encode_learned_prompts(self, self.prompt_learner)

    def logits_from_features(self, image: torch.Tensor) -> torch.Tensor:
        text = self.prompt_features()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image @ text.t()
