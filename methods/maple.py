"""MaPLe: multi-modal prompts, the image prompts projected from the text prompts.

"MaPLe: Multi-modal Prompt Learning" (CVPR 2023, arXiv 2210.03117).  Reproduces the
official trainer (``trainers/maple.py``) and its modified CLIP (``clip/model.py``: the
MaPLe residual blocks and vision transformer):

* Text: the prompt of class c is ``[SOS] ctx_1 .. ctx_M <rest of CTX_INIT> [name of c] .
  [EOS]``.  With ``CTX_INIT`` and ``N_CTX <= 4`` the M learned vectors start as the
  token embeddings of the first M words of ``CTX_INIT`` and replace only those words:
  with the official N_CTX 2 and "a photo of a", the prompt reads "<ctx> <ctx> of a
  {class}.".  Otherwise they are drawn from N(0, 0.02^2) and the prompt is "X .. X
  {class}.".
* Image: ``proj`` (text width -> image width) maps the M text vectors to M image tokens,
  appended *after* the class and patch tokens once the positional embedding is added,
  so they pass through ``ln_pre`` with them.
* Deeper layers (``PROMPT_DEPTH`` J > 1): blocks 1..J-1 (counting from 0; block 0 sees the
  prompts above) first overwrite the M prompt positions with learned vectors: text
  positions 1..M with ``compound_prompts_text[i-1]``, and the last M image tokens with
  ``compound_prompt_projections[i-1]`` of that same text prompt.  Later blocks carry the
  previous block's outputs at those positions.
* Initialisation in the official order of random draws: ``proj`` (torch's Linear
  default), the J-1 text prompts N(0, 0.02^2), then ONE Linear that is deep-copied J-1
  times, so every deep projection starts with the same weights.
* Precision: under ``PREC fp16`` the context follows CLIP (half) and ``proj`` is halved,
  while the deep prompts and their projections stay fp32 parameters and are cast to the
  stream's dtype where they enter (the official ``.half()``).  The official code cannot
  run at fp32 or amp (a half ``proj`` meets an fp32 context; GradScaler refuses fp16
  gradients), so there ``proj`` keeps fp32, as on a CPU.
* Logits: CLIP's logit scale times the cosine similarities.  Text features do not depend
  on the image, so at evaluation they are computed once per class set and weights.

The official trainer registers its whole model (named "MultiModalPromptLearner"); its
checkpoints hold the learned module under ``prompt_learner.`` (``ctx``, ``proj.*``,
``compound_prompts_text.<i>``, ``compound_prompt_projections.<i>.*`` and the
class-dependent ``token_prefix``/``token_suffix``) beside the frozen CLIP
(``image_encoder.*``, ``text_encoder.*``, ``logit_scale``).  Loading takes the learned
keys and ignores the rest; saving writes the ``prompt_learner.`` keys only (the official
loader reads such a file, as it loads non-strictly).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, MethodError, register_method

PREFIX = "prompt_learner."  # the learned module inside the official model
FROZEN_PREFIXES = ("image_encoder.", "text_encoder.", "logit_scale")  # the frozen CLIP in official files


class MultiModalPromptLearner(nn.Module):
    """The learned part, with the official module and parameter names."""

    def __init__(self, clip: nn.Module, classnames: Sequence[str], opts):
        super().__init__()
        dtype = clip.visual.conv1.weight.dtype
        text_width = clip.ln_final.weight.shape[0]  # 512 for ViT-B/16
        image_width = clip.visual.conv1.weight.shape[0]  # 768 for ViT-B/16 (hard-coded officially)
        n_ctx, ctx_init, depth = int(opts.N_CTX), str(opts.CTX_INIT), int(opts.PROMPT_DEPTH)
        if depth < 1:
            raise ValueError(f"MaPLe's PROMPT_DEPTH must be at least 1 (1 = prompts at the input only), not {depth}.")
        if n_ctx < 1:
            raise ValueError(f"MaPLe's N_CTX must be at least 1, not {n_ctx}.")
        if ctx_init and n_ctx <= 4:  # official rule: an init text is used only for up to 4 vectors
            ctx_init = ctx_init.replace("_", " ")
            with torch.no_grad():
                embedding = clip.token_embedding(tokenize([ctx_init])).to(dtype)
            ctx = embedding[0, 1:1 + n_ctx, :].clone()
            self.prefix_text = ctx_init  # the whole text: words past the first M stay fixed
        else:
            ctx = torch.empty(n_ctx, text_width, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.proj = nn.Linear(text_width, image_width)
        if dtype == torch.float16:
            self.proj.half()
        self.ctx = nn.Parameter(ctx)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, text_width)) for _ in range(depth - 1)])
        for prompt in self.compound_prompts_text:
            nn.init.normal_(prompt, std=0.02)
        template = nn.Linear(text_width, image_width)  # one draw, copied: all start equal
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(template) for _ in range(depth - 1)])
        self.register_buffer("token_prefix", torch.empty(0))
        self.register_buffer("token_suffix", torch.empty(0))
        # a plain attribute officially; a buffer here so that it moves with the model and the
        # harness's own checkpoints restore it with the class-dependent embeddings
        self.register_buffer("tokenized_prompts", torch.empty(0, dtype=torch.long))
        self.embed_classnames(clip, classnames)

    @torch.no_grad()
    def embed_classnames(self, clip: nn.Module, classnames: Sequence[str]) -> None:
        names = [name.replace("_", " ") for name in classnames]
        device = clip.token_embedding.weight.device
        tokens = tokenize([f"{self.prefix_text} {name}." for name in names]).to(device)
        embedding = clip.token_embedding(tokens).to(clip.visual.conv1.weight.dtype)
        self.token_prefix = embedding[:, :1, :]  # SOS
        self.token_suffix = embedding[:, 1 + self.n_ctx:, :]  # rest of the init text, name, ".", EOS
        self.tokenized_prompts = tokens

    def text_inputs(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The class prompts' embeddings and the deep text prompts."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        return prompts, list(self.compound_prompts_text)

    def visual_inputs(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image tokens of the input layer and the deep image prompts, projected from text."""
        deep = [layer(prompt) for layer, prompt in zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return self.proj(self.ctx), deep

    def forward(self):
        """The official outputs: prompts, image tokens, deep text prompts, deep image prompts."""
        prompts, deep_text = self.text_inputs()
        shared, deep_visual = self.visual_inputs()
        return prompts, shared, deep_text, deep_visual


def _run_with_deep_prompts(blocks, x: torch.Tensor, attn_mask, deep: list[torch.Tensor],
                           place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Blocks 1..len(deep) first overwrite the prompt positions with deep[i - 1]."""
    for index, block in enumerate(blocks):
        if 1 <= index <= len(deep):
            x = place(x, deep[index - 1].to(x.dtype))  # official: .half() (the stream's dtype under fp16)
        x = block(x, attn_mask=attn_mask)
    return x


@register_method(
    "maple", node="MAPLE",
    defaults=dict(N_CTX=2, CTX_INIT="a photo of a", PREC="fp16", PROMPT_DEPTH=9),
    paper="MaPLe: Multi-modal Prompt Learning (CVPR 2023)", paper_name="MaPLe",
    code="the official MaPLe code base, trainers/maple.py and clip/model.py")
class MaPLe(Method):
    trainable = ("prompt_learner.",)
    official_module = "official_layout"
    official_ignore = (PREFIX + "token_prefix", PREFIX + "token_suffix", PREFIX + "tokenized_prompts")

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        visual = clip.visual
        if not hasattr(visual, "class_embedding") or not hasattr(visual, "ln_pre"):
            raise MethodError("MaPLe needs a vision transformer backbone (its image prompts are tokens); "
                              f"got {type(visual).__name__}.")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise MethodError("MaPLe reads the class token of CLIP's vision transformer; this backbone "
                              "pools its tokens otherwise.")
        if not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity):
            raise MethodError("MaPLe's image prompts sit at the end of the token sequence; patch dropout "
                              "would drop tokens before them. Use a backbone without patch dropout.")
        for tower in (clip.transformer, visual.transformer):
            if not getattr(tower, "batch_first", True):
                raise MethodError("MaPLe expects open_clip transformers in batch-first layout "
                                  "(open_clip >= 2.24).")
        depth = int(self.options.PROMPT_DEPTH)
        n_blocks = min(len(clip.transformer.resblocks), len(visual.transformer.resblocks))
        if depth > n_blocks:
            raise ValueError(f"MaPLe's PROMPT_DEPTH ({depth}) exceeds the {n_blocks} blocks of the backbone; "
                             f"the official code would create prompts it never uses.")
        self.prompt_learner = MultiModalPromptLearner(clip, classnames, self.options)

    # -- class names and weights ------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.prompt_learner.embed_classnames(self.clip, classnames)

    @property
    def official_layout(self) -> "_OfficialLayout":
        return _OfficialLayout(self)

    def load_official_state_dict(self, state_dict: dict) -> None:
        # the official file also holds the frozen CLIP; only the learned module is taken
        learned = {k: v for k, v in state_dict.items() if not k.startswith(FROZEN_PREFIXES)}
        super().load_official_state_dict(learned)

    # -- encoders ----------------------------------------------------------------------
    def encode_text(self) -> torch.Tensor:
        learner = self.prompt_learner
        prompts, deep = learner.text_inputs()
        n_ctx = learner.n_ctx

        def place(x, prompt):  # tokens 1..n_ctx (after SOS)
            return torch.cat([x[:, :1], prompt.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + n_ctx:]], dim=1)

        return self.encode_prompts(
            prompts, learner.tokenized_prompts,
            lambda blocks, x, mask: _run_with_deep_prompts(blocks, x, mask, deep, place))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        shared, deep = self.prompt_learner.visual_inputs()
        n_ctx = shared.shape[0]
        x = visual.conv1(images.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid**2, width)
        cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                               dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = torch.cat([x, shared.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)

        def place(x, prompt):  # the last n_ctx tokens
            return torch.cat([x[:, :-n_ctx], prompt.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)

        x = _run_with_deep_prompts(visual.transformer.resblocks, x, None, deep, place)
        return visual.ln_post(x[:, 0, :]) @ visual.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.prompt_features()
        image = self.encode_image(images)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image @ text.t()


class _OfficialLayout:
    """The learned weights under the official model's key names (for writing checkpoints)."""

    def __init__(self, method: MaPLe):
        self.method = method

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((PREFIX + k, v) for k, v in self.method.prompt_learner.state_dict().items()
                           if k != "tokenized_prompts")  # not in the official model's state dict
