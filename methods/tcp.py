"""TCP: class-aware text tokens, made from hand-written prompts, inside the text encoder.

"TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model" (CVPR 2024, arXiv
2311.18231).  Reproduces the official trainer (``trainers/tcp.py`` and the modified text
blocks of ``trainers/clip_text/model.py`` of the authors' repository):

* the learned prompt of class c is ``[SOS] ctx_1..ctx_4 <rest of the dataset's prompt> [EOS]``:
  the dataset's official prompt form with four placeholder words ("X X X X {}, a type of
  pet."; UCF101 and the ImageNets "a photo of a ...", whose first four words are replaced the
  same way; Stanford Cars' form has no full stop) and the context in place of those words,
  drawn from N(0, 0.02^2) (``CTX_INIT`` false, the official config) or the words "a photo of
  a" (``CTX_INIT`` true);
* Textual Knowledge Embedding: the hand-written prompts of the classes (another table:
  "a photo of an aircraft {}.", "a photo of a {}, a type of texture.", ...) through the
  frozen CLIP, normalised, then ``meta_net`` = Linear(e -> e/4) + QuickGELU + Linear(e/4 ->
  4 x width) (e: CLIP's embedding dimension), reshaped to four class-aware tokens per class;
* the text blocks run on the learned prompts; the input of block 9 (index 8) has its
  positions 1..4 replaced by ``1.0 * class tokens + 0.0 * themselves`` (the official weight
  is hard-coded to 1.0, whatever ``W`` says), so the context reaches the features only
  through blocks 1..8 and the class tokens through blocks 9..12;
* logits: CLIP's logit scale times the cosine of the frozen image features and the text
  features; loss = cross-entropy + 8 (1 - mean cos(text feature, hand-written feature)),
  KgCoOp's regulariser (the official forward writes the factor 8.0 itself; here it is ``W``,
  8.0 in the official script);
* precision ``fp16`` (the official default): CLIP, the context and the meta-net in half
  precision (the official switch of the meta-net is ``TRAINER.COCOOP.PREC``, fp16 by
  default), the hand-written prompts encoded by a half-precision CLIP; optimiser Adam with
  eps 1e-3 (the official README patches the toolbox's Adam, "fp16 ... will produce NaN
  loss"; ``ADAM_EPS``).  The official ``amp`` branch crashes (the training forward needs the
  labels); here it applies the same loss.
* trained: the whole ``prompt_learner`` (context and meta-net); everything else is frozen.

The learned module is ``prompt_learner`` with the official names (``ctx``,
``meta_net.linear1.*``, ``meta_net.linear2.*``; the class-dependent ``token_prefix`` and
``token_suffix`` are dropped on load), so official checkpoints load directly.

Generalised: the official meta-net output is reshaped with the width 512 written in; here
the text tower's width (the same on ViT-B/16).  Class-specific contexts (``CSC``) crash the
official forward and are refused; ``CLASS_TOKEN_POSITION`` is ignored there (the name is
always last) and here.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, MethodError, encode_tokens, register_method

INIT_WORDS = "a photo of a"  # the official code uses these words whenever CTX_INIT is true
CLASS_TOKENS = 4  # the meta-net's output: 4 tokens per class (written in the official code)
KNOWLEDGE_LAYER = 8  # the class tokens enter the text block of this index (0-based)
KNOWLEDGE_WEIGHT = 1.0  # their weight against the positions they replace (written in)
COS_EPS = 1e-7  # the official cosine-similarity epsilon

# the official tables (keyed by the official DATASET.NAME there, by the catalogue's name here)
HANDCRAFTED_TEMPLATES = {  # CUSTOM_TEMPLATES_ori: the prompts of the textual knowledge
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of a {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
PROMPT_TEMPLATES = {  # CUSTOM_TEMPLATES: the learned prompts (the first four words are the context)
    "oxford_pets": "X X X X {}, a type of pet.",
    "oxford_flowers": "X X X X {}, a type of flower.",
    "fgvc_aircraft": "X X X X {}, a type of aircraft.",
    "dtd": "X X X X {} texture.",
    "eurosat": "X X X X {}.",
    "stanford_cars": "X X X X {}, a type of car",  # sic: no full stop
    "food101": "X X X X {}, a type of food.",
    "sun397": "X X X X {}.",
    "caltech101": "X X X X {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
GENERIC_PROMPT = "X X X X {}."  # datasets outside the official tables (toy, synthetic)


def tcp_templates(dataset) -> tuple[str, str]:
    """(hand-written template, learned-prompt template) of the dataset being classified (a
    ``DatasetContext``); outside the official tables (the toy world, other data) the
    dataset's own template and the generic learned form."""
    if dataset.world != "toy" and dataset.name in HANDCRAFTED_TEMPLATES:
        return HANDCRAFTED_TEMPLATES[dataset.name], PROMPT_TEMPLATES[dataset.name]
    return dataset.template, GENERIC_PROMPT


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PromptLearner(nn.Module):
    """The official ``prompt_learner``: ``ctx``, ``meta_net`` and the class-name buffers."""

    def __init__(self, clip: nn.Module, opts):
        super().__init__()
        dtype = clip.visual.conv1.weight.dtype
        width = clip.ln_final.weight.shape[0]
        embed = clip.text_projection.shape[1]  # the official vis_dim (= the text features' dimension)
        if opts.CSC:
            raise MethodError("TRAINER.TCP.CSC: class-specific contexts crash the official TCP forward; use False.")
        if opts.CTX_INIT:
            with torch.no_grad():
                embedding = clip.token_embedding(tokenize([INIT_WORDS])).to(dtype)
            self.n_ctx = len(INIT_WORDS.split(" "))
            ctx = embedding[0, 1:1 + self.n_ctx, :].clone()
        else:
            self.n_ctx = int(opts.N_CTX)
            ctx = torch.empty(self.n_ctx, width, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        # construction order as the official code: ctx, then the meta-net (torch's default init)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(embed, embed // 4, bias=True)),
            ("relu", QuickGELU()),
            ("linear2", nn.Linear(embed // 4, CLASS_TOKENS * width, bias=True)),
        ]))
        if dtype == torch.float16:
            self.meta_net.half()
        self.width = width
        self.register_buffer("token_prefix", torch.empty(0))
        self.register_buffer("token_suffix", torch.empty(0))

    @torch.no_grad()
    def embed_classnames(self, clip: nn.Module, classnames: Sequence[str], template: str) -> None:
        names = [name.replace("_", " ") for name in classnames]
        tokens = tokenize([template.format(name) for name in names]).to(self.ctx.device)
        embedding = clip.token_embedding(tokens).to(self.ctx.dtype)
        self.token_prefix = embedding[:, :1, :]  # SOS
        self.token_suffix = embedding[:, 1 + self.n_ctx:, :]  # the rest of the prompt, EOS, padding
        self.tokenized_prompts = tokens

    def class_tokens(self, handcrafted: torch.Tensor) -> torch.Tensor:
        """(classes, 4, width): the textual knowledge of each class as tokens."""
        tokens = self.meta_net(handcrafted)
        return tokens.reshape(tokens.shape[0], -1, self.width)

    def forward(self) -> torch.Tensor:
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


def _released_clip(clip: nn.Module) -> nn.Module:
    """The official code encodes the hand-written prompts with a separately loaded CLIP,
    half precision on a GPU, whatever the trained model's precision."""
    if clip.logit_scale.device.type == "cuda" and clip.visual.conv1.weight.dtype != torch.float16:
        from benchmark.precision import cast_clip

        return cast_clip(copy.deepcopy(clip), "fp16")
    return clip


@register_method(
    "tcp", node="TCP",
    # the official train.py defaults (its node is TRAINER.COOP); the YAML sets the script's values
    defaults=dict(N_CTX=16, CSC=False, CTX_INIT=False, W=1.0, PREC="fp16", CLASS_TOKEN_POSITION="end",
                  ADAM_EPS=1e-3),
    paper="TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model (CVPR 2024)", paper_name="TCP",
    code="the authors' Textual-based_Class-aware_prompt_tuning repository, trainers/tcp.py")
class TCP(Method):
    trainable = ("prompt_learner.",)
    official_module = "prompt_learner"
    official_ignore = ("token_prefix", "token_suffix")
    frozen_image_features = True

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        n_blocks = len(clip.transformer.resblocks)
        if n_blocks <= KNOWLEDGE_LAYER:
            raise MethodError(f"TCP puts its class-aware tokens into text block {KNOWLEDGE_LAYER + 1}; this backbone's "
                              f"text tower has {n_blocks} blocks.")
        self.weight = float(self.options.W)
        self.prompt_learner = PromptLearner(clip, self.options)
        # outside the learned module, as the official code keeps them (not in its state dict)
        self.register_buffer("handcrafted_features", torch.empty(0), persistent=False)
        self._score: torch.Tensor | None = None
        self.set_classnames(classnames)

    # -- class names ---------------------------------------------------------------
    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        handcrafted, prompt = tcp_templates(self.dataset)
        clip = _released_clip(self.clip)
        texts = [handcrafted.format(name.replace("_", " ")) for name in self.classnames]
        features = encode_tokens(clip, tokenize(texts).to(clip.logit_scale.device),
                                 truncate=self.fast("TRUNCATE_TEXT"))
        self.handcrafted_features = features / features.norm(dim=-1, keepdim=True)
        self.prompt_learner.embed_classnames(self.clip, self.classnames, prompt)
        self._embedded = list(self.classnames)
        self._score = None

    def on_weights_loaded(self) -> None:
        if self._embedded != self.classnames:  # a harness checkpoint restores its class names
            self.set_classnames(self.classnames)

    # -- text encoder --------------------------------------------------------------
    def _run_blocks(self, class_tokens: torch.Tensor, blocks, x: torch.Tensor, attn_mask) -> torch.Tensor:
        n = class_tokens.shape[1]
        for index, block in enumerate(blocks):
            if index == KNOWLEDGE_LAYER:
                middle = x[:, 1:1 + n, :]
                mixed = KNOWLEDGE_WEIGHT * class_tokens + (1 - KNOWLEDGE_WEIGHT) * middle
                x = torch.cat([x[:, :1, :], mixed.to(x.dtype), x[:, 1 + n:, :]], dim=1)
            x = block(x, attn_mask=attn_mask)
        return x

    def encode_text(self) -> torch.Tensor:
        learner = self.prompt_learner
        class_tokens = learner.class_tokens(self.handcrafted_features.to(learner.meta_net.linear1.weight.dtype))
        return self.encode_prompts(learner(), learner.tokenized_prompts,
                                   lambda blocks, x, mask: self._run_blocks(class_tokens, blocks, x, mask))

    # -- forward and loss ----------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))

    def logits_from_features(self, image: torch.Tensor) -> torch.Tensor:
        text = self.prompt_features()
        text = text / text.norm(dim=-1, keepdim=True)
        image = image / image.norm(dim=-1, keepdim=True)
        handcrafted = self.handcrafted_features / self.handcrafted_features.norm(dim=-1, keepdim=True)
        # the regulariser depends on the prompts only; kept for ``loss`` of this step
        self._score = 1.0 - F.cosine_similarity(text, handcrafted, dim=1, eps=COS_EPS).mean()
        return self.clip.logit_scale.exp() * image @ text.t()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._score is None:
            raise RuntimeError("TCP.loss needs the forward pass of the same step first.")
        return F.cross_entropy(logits, labels) + self.weight * self._score
