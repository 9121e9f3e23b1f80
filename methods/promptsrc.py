"""PromptSRC: deep text and image prompts regulated by the frozen CLIP.

"Self-regulating Prompts: Foundational Model Adaptation without Forgetting" (ICCV 2023,
arXiv 2307.06948).  Reproduces the official trainer (``trainers/promptsrc.py`` and the
independent vision-language prompt blocks of its ``clip/model.py``):

* Text: the prompt of class c is ``[SOS] ctx_1 .. ctx_M [name of c] . [EOS]``.  With
  ``CTX_INIT`` and ``N_CTX_TEXT <= 4`` the M vectors start as the embeddings of the first M
  tokens of the init text, and the written prompt is "<init text> <name>." (so with M = 2
  and "a photo of a" the words "of a" stay fixed); otherwise N(0, 0.02^2) and "X X .. X".
  Blocks 1 .. PROMPT_DEPTH_TEXT - 1 (block 0 is the first) each replace the M token rows
  after SOS with their own learned vectors.
* Image: N_CTX_VISION learned tokens are appended after the patch tokens (after the
  positional embedding, before ``ln_pre``); blocks 1 .. PROMPT_DEPTH_VISION - 1 replace the
  last N_CTX_VISION rows with their own vectors.  Depth 0 means no image prompts.
  Every deep and image prompt starts as N(0, 0.02^2) and is an fp32 parameter; it is cast
  to the activations' dtype where it enters (the official code casts to half, the dtype
  of the only precision it runs).  The text context follows CLIP's dtype.
* Loss in training: cross-entropy + TEXT_LOSS_WEIGHT * L1(prompted text features, frozen
  text features) + IMAGE_LOSS_WEIGHT * L1(prompted image features, frozen image features)
  + KL(frozen logits || prompted logits) summed and divided by the number of logits.  All
  features are L2-normalised; the L1 losses are means over elements.  The frozen text
  feature of a class is the mean of CLIP's (unnormalised) fp32 text features over the 60
  ImageNet templates, normalised; the frozen image feature is CLIP's image feature of the
  same batch without prompts; frozen logits use CLIP's logit scale.
* Gaussian prompt aggregation (GPA): after each epoch's last step, the model's weights
  are added to a running sum with weight g(epoch) / sum g, g the normal density with
  GPA_MEAN, GPA_STD at epochs 1..MAX_EPOCH; after the last epoch the sum replaces the
  weights.  The official trainer aggregates its *whole* state dict (the frozen CLIP too,
  whose rounding in fp16 perturbs it slightly); so does this one, so numbers match.  The
  frozen part never changes during training, so it is folded once at the end, and the
  harness's own checkpoints (no CLIP weights) store the epoch weights to repeat it.
* Precision: ``fp16`` as the official configs (CLIP and the text context in half
  precision, the other prompts fp32).  The official ``fp32`` and ``amp`` paths crash
  (half-precision zero-shot encoder, tuple loss); here they run plainly.

The learned weights sit in ``prompt_learner`` (``ctx``, ``vpt``, ``vpt_deep.<block>``,
``text_deep.<block>``).  The official checkpoint (``VLPromptLearner/model.pth.tar-N``)
holds the whole official model; ``official_layout`` gives and takes that layout:
``prompt_learner.ctx``, ``image_encoder.VPT``,
``image_encoder.transformer.resblocks.<i>.VPT_shallow``,
``text_encoder.transformer.resblocks.<i>.VPT_shallow``, the frozen CLIP under
``image_encoder.*``, ``text_encoder.*``, ``logit_scale`` and a copy of the image encoder
under ``prompt_learner.ZS_image_encoder.*``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, MethodError, copy_checked, encode_tokens, register_method

# the 60 templates the official trainer averages for the frozen text features (every dataset)
IMAGENET_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)

MAX_PROMPTS_PER_PASS = 2048  # text sequences per encoder pass for the frozen text features
_CLASS_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
_ZS_PREFIX = "prompt_learner.ZS_image_encoder."


def _is_learned(official_key: str) -> bool:
    # what the official trainer leaves trainable: the text context and every "VPT" tensor
    return official_key == "prompt_learner.ctx" or "VPT" in official_key


def gpa_weights(max_epoch: int, mean: float, std: float) -> np.ndarray:
    """The weight of each epoch (index 0 = first epoch) in the aggregate, as the official
    trainer computes it: the normal density at epochs 1..N, divided by its sum."""
    def density(x):
        return (1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((x - mean) / std) ** 2)

    weights = np.array([density(a) for a in range(1, max_epoch + 1)])
    return weights / sum(weights)


class PromptLearner(nn.Module):
    """The learned prompts (harness names) and the class-dependent token rows."""

    def __init__(self, clip: nn.Module, classnames: Sequence[str], opts):
        super().__init__()
        dtype = clip.visual.conv1.weight.dtype
        text_width = clip.ln_final.weight.shape[0]
        visual_width = clip.visual.conv1.weight.shape[0]
        n_text, n_visual = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
        self.n_ctx = int(opts.N_CTX_TEXT)
        self.n_ctx_vision = int(opts.N_CTX_VISION)
        self.depth_text = int(opts.PROMPT_DEPTH_TEXT)
        self.depth_vision = int(opts.PROMPT_DEPTH_VISION)
        if not 1 <= self.depth_text <= n_text:
            raise MethodError(f"PromptSRC's PROMPT_DEPTH_TEXT ({self.depth_text}) must be within 1..{n_text} "
                              f"(the official code requires text prompts; depth 1 means input prompts only).")
        if not 0 <= self.depth_vision <= n_visual:
            raise MethodError(f"PromptSRC's PROMPT_DEPTH_VISION ({self.depth_vision}) must be within 0..{n_visual}.")
        if self.n_ctx < 1 or (self.depth_vision > 0 and self.n_ctx_vision < 1):
            raise MethodError("PromptSRC needs N_CTX_TEXT >= 1 and, with image prompts, N_CTX_VISION >= 1.")

        # image prompts, then the deep ones of each tower, then a random text context: the
        # official construction order (its draws interleave with CLIP's own initialisation,
        # so the random stream cannot be the same; the distributions are)
        if self.depth_vision > 0:
            self.vpt = nn.Parameter(torch.empty(self.n_ctx_vision, visual_width).normal_(std=0.02))
        self.vpt_deep = nn.ParameterDict({
            str(i): nn.Parameter(torch.empty(self.n_ctx_vision, visual_width).normal_(std=0.02))
            for i in range(1, self.depth_vision)})
        self.text_deep = nn.ParameterDict({
            str(i): nn.Parameter(torch.empty(self.n_ctx, text_width).normal_(std=0.02))
            for i in range(1, self.depth_text)})

        ctx_init = str(opts.CTX_INIT)
        if ctx_init and self.n_ctx <= 4:  # the official rule: init words only for up to 4 vectors
            ctx_init = ctx_init.replace("_", " ")
            with torch.no_grad():
                embedding = clip.token_embedding(tokenize([ctx_init]).to(clip.token_embedding.weight.device))
            ctx = embedding[0, 1:1 + self.n_ctx, :].to(dtype).clone()
            self.prefix_text = ctx_init
        else:
            ctx = torch.empty(self.n_ctx, text_width, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * self.n_ctx)
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("token_prefix", torch.empty(0))
        self.register_buffer("token_suffix", torch.empty(0))
        self.embed_classnames(clip, classnames)

    @torch.no_grad()
    def embed_classnames(self, clip: nn.Module, classnames: Sequence[str]) -> None:
        names = [name.replace("_", " ") for name in classnames]
        tokens = tokenize([f"{self.prefix_text} {name}." for name in names]).to(self.ctx.device)
        embedding = clip.token_embedding(tokens).to(self.ctx.dtype)
        self.token_prefix = embedding[:, :1, :]  # SOS
        self.token_suffix = embedding[:, 1 + self.n_ctx:, :]  # the rest of the sentence, EOS, padding
        self.tokenized_prompts = tokens

    def forward(self) -> torch.Tensor:
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


class _OfficialLayout:
    """The official checkpoint's view of a PromptSRC model: ``state_dict()`` under the
    official key names (what ``benchmark.save_official_checkpoint`` writes)."""

    def __init__(self, method: "PromptSRC"):
        self.method = method

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v.detach()) for k, v in self.method.official_tensors().items())


@register_method(
    "promptsrc", node="PROMPTSRC",
    defaults=dict(N_CTX_VISION=4, N_CTX_TEXT=4, CTX_INIT="a photo of a", PREC="fp16",
                  PROMPT_DEPTH_VISION=9, PROMPT_DEPTH_TEXT=9, TEXT_LOSS_WEIGHT=25,
                  IMAGE_LOSS_WEIGHT=10, GPA_MEAN=15, GPA_STD=1),
    epoch_options=("GPA_MEAN", "GPA_STD"),
    paper="Self-regulating Prompts: Foundational Model Adaptation without Forgetting (ICCV 2023)",
    paper_name="PromptSRC", code="the PromptSRC code base, trainers/promptsrc.py")
class PromptSRC(Method):
    trainable = ("prompt_learner.",)
    official_module = "official_layout"
    official_ignore = _CLASS_BUFFERS

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        if not getattr(clip.visual.transformer, "batch_first", True) or not getattr(clip.transformer, "batch_first", True):
            raise MethodError("PromptSRC expects a batch-first open_clip transformer.")
        self.prompt_learner = PromptLearner(clip, classnames, self.options)
        self._fixed_text: torch.Tensor | None = None  # frozen text features of the classes (fp32)
        self._extras: dict | None = None  # what the training forward leaves for ``loss``
        self._gpa: dict[str, torch.Tensor] | None = None  # running GPA sum of the prompts
        self._gpa_weights: list[float] = []  # the epoch weights added to it so far
        self._frozen_gpa: list[float] = []  # epoch weights the frozen weights were folded with

    # -- class names and caches ------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.prompt_learner.embed_classnames(self.clip, classnames)
        self._fixed_text = None

    def train(self, mode: bool = True) -> "PromptSRC":
        self._extras = None
        return super().train(mode)

    # -- encoders -----------------------------------------------------------------------
    def _text_blocks(self, blocks, x: torch.Tensor, attn_mask) -> torch.Tensor:
        learner, n = self.prompt_learner, self.prompt_learner.n_ctx
        for i, block in enumerate(blocks):
            if str(i) in learner.text_deep:  # blocks 1..depth-1 put their own vectors after SOS
                deep = learner.text_deep[str(i)].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=attn_mask)
        return x

    def encode_text(self) -> torch.Tensor:
        learner = self.prompt_learner
        return self.encode_prompts(learner(), learner.tokenized_prompts, self._text_blocks)

    def encode_image(self, images: torch.Tensor, prompted: bool = True) -> torch.Tensor:
        visual, learner = self.clip.visual, self.prompt_learner
        x = visual.conv1(images.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                               dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        prompted = prompted and learner.depth_vision > 0
        n = learner.n_ctx_vision
        if prompted:  # image prompts go after the patch tokens
            x = torch.cat([x, learner.vpt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            if prompted and str(i) in learner.vpt_deep:  # replace the last n rows
                deep = learner.vpt_deep[str(i)].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :x.shape[1] - n], deep], dim=1)
            x = block(x)
        x = visual.ln_post(x[:, 0, :])
        return x @ visual.proj

    @torch.no_grad()
    def frozen_text_features(self) -> torch.Tensor:
        """CLIP's fp32 text features averaged over the 60 templates (not normalised), one per class;
        computed once per class set."""
        if self._fixed_text is None:
            clip = self.clip
            if clip.text_projection.dtype != torch.float32 or clip.transformer.resblocks[0].mlp.c_fc.weight.dtype != torch.float32:
                # the official trainer loads a separate fp32 CLIP for these features
                clip = copy.deepcopy(clip, {id(clip.visual): nn.Identity()}).float()
            names = [name.replace("_", " ") for name in self.classnames]
            device = self.clip.logit_scale.device
            # the official code encodes one template at a time; several templates per pass
            # give the same features (every sequence is encoded on its own), in fewer passes
            per_pass = max(1, MAX_PROMPTS_PER_PASS // len(names))
            features = []
            for start in range(0, len(IMAGENET_TEMPLATES), per_pass):
                templates = IMAGENET_TEMPLATES[start:start + per_pass]
                tokens = tokenize([t.replace("{}", name) for t in templates for name in names]).to(device)
                features.append(encode_tokens(clip, tokens, truncate=self.fast("TRUNCATE_TEXT"))
                                .view(len(templates), len(names), -1))
            self._fixed_text = torch.cat(features).transpose(0, 1).mean(dim=1)  # (classes, templates, d) -> mean
        return self._fixed_text

    # -- forward and loss -----------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit_scale = self.clip.logit_scale.exp()
        text = self.prompt_features()
        image = self.encode_image(images)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = logit_scale * image @ text.t()
        if self.training:
            fixed = self.frozen_text_features()
            fixed = fixed / fixed.norm(dim=-1, keepdim=True)
            with torch.no_grad():
                zs_image = self.encode_image(images, prompted=False)
                zs_image = zs_image / zs_image.norm(dim=-1, keepdim=True)
                # official: frozen text features in half precision here, fp32 in the L1 term
                zs_logits = logit_scale * zs_image @ fixed.to(zs_image.dtype).t()
            self._extras = dict(text=text, fixed=fixed, image=image, zs_image=zs_image, zs_logits=zs_logits)
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        extras, self._extras = self._extras, None
        if extras is None:
            raise RuntimeError("PromptSRC.loss needs the training-mode forward of the same batch "
                               "(call model.train() and model(images) first).")
        opts = self.options
        ce = F.cross_entropy(logits, labels)
        text = F.l1_loss(extras["text"], extras["fixed"], reduction="mean") * opts.TEXT_LOSS_WEIGHT
        image = F.l1_loss(extras["image"], extras["zs_image"], reduction="mean") * opts.IMAGE_LOSS_WEIGHT
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(extras["zs_logits"], dim=1),
                      reduction="sum", log_target=True) / logits.numel()
        return ce + (kl + text + image)

    # -- Gaussian prompt aggregation --------------------------------------------------------
    def _learned_tensors(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v) for k, v in self.official_tensors().items() if _is_learned(k))

    def _constant_tensors(self, with_class_buffers: bool = True) -> "OrderedDict[str, torch.Tensor]":
        # the rest of the official state dict, without the zero-shot image encoder copy (here
        # the same tensors as the prompted one, and the official aggregate of both is identical)
        return OrderedDict((k, v) for k, v in self.official_tensors().items()
                           if not _is_learned(k) and not k.startswith(_ZS_PREFIX)
                           and (with_class_buffers or k not in _CLASS_BUFFERS))

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        opts = self.options
        weight = float(gpa_weights(max_epoch, opts.GPA_MEAN, opts.GPA_STD)[epoch])
        current = self._learned_tensors()
        if self._gpa is None or epoch == 0:
            self._gpa, self._gpa_weights = {k: v.detach() * weight for k, v in current.items()}, [weight]
        else:
            self._gpa = {k: self._gpa[k] + v.detach() * weight for k, v in current.items()}
            self._gpa_weights.append(weight)

    @staticmethod
    def _fold(tensor: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """What the official running sum makes of a tensor that did not change over the epochs."""
        total = tensor.detach() * weights[0]
        for weight in weights[1:]:
            total = total + tensor.detach() * weight
        return total

    @torch.no_grad()
    def on_train_end(self) -> None:
        if self._gpa is None:
            return
        for key, value in self._learned_tensors().items():
            value.copy_(self._gpa[key])
        # the official sum also runs over the frozen CLIP and the class token rows: in fp16
        # its rounding moves them slightly, and the official evaluation uses the result
        for value in self._constant_tensors().values():
            value.copy_(self._fold(value, self._gpa_weights))
        self._frozen_gpa = list(self._gpa_weights)
        self._gpa, self._gpa_weights = None, []

    # the harness's own checkpoints keep no CLIP weights: they record the epoch weights of the
    # aggregate so that loading one repeats the (deterministic) change of the frozen weights
    def get_extra_state(self) -> dict:
        return {"frozen_gpa_weights": list(self._frozen_gpa)}

    @torch.no_grad()
    def set_extra_state(self, state: dict) -> None:
        weights = list(state.get("frozen_gpa_weights", [])) if isinstance(state, dict) else []
        if weights == self._frozen_gpa:
            return
        if self._frozen_gpa:
            raise MethodError("This PromptSRC model's frozen CLIP weights were already aggregated with "
                              "other epoch weights; load the checkpoint into a freshly built model.")
        for value in self._constant_tensors(with_class_buffers=False).values():
            value.copy_(self._fold(value, weights))
        self._frozen_gpa = weights

    # -- official checkpoints -------------------------------------------------------------
    def official_tensors(self) -> "OrderedDict[str, torch.Tensor]":
        """Every tensor of the official model's state dict, under its official name (live tensors)."""
        learner, clip = self.prompt_learner, self.clip
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        out["prompt_learner.ctx"] = learner.ctx
        out["prompt_learner.token_prefix"] = learner.token_prefix
        out["prompt_learner.token_suffix"] = learner.token_suffix
        visual = clip.visual.state_dict(keep_vars=True)
        for key, value in visual.items():
            out[_ZS_PREFIX + key] = value
        if learner.depth_vision > 0:
            out["image_encoder.VPT"] = learner.vpt
        for i, value in learner.vpt_deep.items():
            out[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = value
        for key, value in visual.items():
            out["image_encoder." + key] = value
        for i, value in learner.text_deep.items():
            out[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = value
        for key, value in clip.state_dict(keep_vars=True).items():
            if key.startswith("visual.") or key in ("token_embedding.weight", "logit_scale"):
                continue  # the official model keeps no token embedding
            out["text_encoder." + key] = value
        out["logit_scale"] = clip.logit_scale
        return out

    @property
    def official_layout(self) -> _OfficialLayout:
        return _OfficialLayout(self)

    def learned_official_keys(self) -> list[str]:
        return [k for k in self.official_tensors() if _is_learned(k)]

    def load_official_state_dict(self, state_dict: dict) -> None:
        """Load an official checkpoint's state dict: the prompts (required) and the frozen
        CLIP weights it holds (the official evaluation loads them too: after GPA they differ
        from the released CLIP by rounding).  The class-dependent token rows are dropped and
        the zero-shot encoder copy is not used."""
        own = self.official_tensors()
        state = {k: v for k, v in state_dict.items() if k not in _CLASS_BUFFERS and not k.startswith(_ZS_PREFIX)}
        missing = [k for k in self.learned_official_keys() if k not in state]
        copy_checked(state, own, missing, "PromptSRC as configured",
                     "N_CTX_TEXT/N_CTX_VISION, PROMPT_DEPTH_TEXT/PROMPT_DEPTH_VISION and the backbone")
        if any(not _is_learned(k) for k in state):
            self._frozen_gpa = []  # the file's frozen weights replace any earlier aggregate
        self.on_weights_loaded()
