"""ProGrad: CoOp's context updated only along gradients that do not fight the zero-shot prompt.

"Prompt-aligned Gradient for Prompt Tuning" (ICCV 2023, arXiv 2205.14865).  Reproduces the
official trainer (``ProGrad.public/trainers/prograd.py``) and its modified toolbox step
(``prograd_backward_and_update`` in ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``):

* the learner is CoOp's: ``[SOS] ctx_1 .. ctx_M [name of c] . [EOS]`` (class name at the end,
  as every official script; the official "middle" branch refers to an undefined name and
  fails, here it is CoOp's middle, and the front is CoOp's).  ``CTX_INIT`` is a switch: when true, the context starts
  from the *dataset's ProGrad template* (``TEMPLATES`` below) with " {}." removed: its first
  w tokens (w = the number of space-separated words, not of tokens) go into the last w of
  the M vectors and the first M - w vectors are zeros; the written prompt is
  "X .. X <template words> <name>.".  Where a word is two tokens ("pet," in "a type of
  pet, a photo of a"), the last template words stay fixed text after the context, as
  officially.  When false, M vectors from N(0, 0.02^2), one set or one per class (``CSC``).
* the zero-shot teacher: a separately loaded CLIP in fp32 with the same ProGrad template
  ("_" read as a space), text features L2-normalised once; its logits are CLIP's logit scale
  times the cosine similarities of the same (augmented) training batch.
* losses of a step (T = ``T``): xe = cross-entropy(student logits, labels);
  kl = mean over images of sum over classes of -softmax(teacher / T) * log_softmax(student / T)
  * T * T (the official "KL" is the cross-entropy to the teacher's distribution: the same
  gradient as the KL divergence, a value larger by the teacher's entropy).
* the update (lambda = ``LAMBDA``): for each learned tensor, g_kl = d kl / d p and
  g_xe = d xe / d p; when cos(g_xe, g_kl) < 0, p.grad = g_xe - lambda * (g_xe . u) u with
  u = g_kl / |g_kl|, else p.grad = g_xe; then the optimiser steps.  The official few-shot
  results on Flowers102, DTD and EuroSAT at 8 and 16 shots use lambda 0.8 (its README):
  ``LAMBDA_BY_SHOTS`` ([[shots, lambda], ...], the run's shots are told by the harness).
* precision: ``fp16`` (the official default) keeps CLIP and the context in half precision;
  the gradients and their projection are then half precision too, as officially.  The
  official ``amp`` branch crashes (it hands the (xe, kl) pair to the GradScaler); here amp
  runs the same step under the GradScaler (its two inner backward passes unscaled).
  An earlier revision of the official trainer also offered a distillation loss ("kd") and a
  "vertical_grad" variant; the published method is the "prograd" loss, reproduced here.

How the step fits the harness's loop.  The trainer calls ``loss`` and then
``optimizer_step``: zero_grad, ``loss.backward()``, step.  ``loss`` runs the two official
backward passes itself (``torch.autograd.grad`` of kl, then of xe, through the same graph),
projects, and returns xe's value through an autograd function whose backward hands every
learned tensor its projected gradient (times the incoming gradient: exactly 1 without a
GradScaler, the scale with one, which the scaler divides out).  So the harness's loop, schedule,
non-finite checks and logging stay as they are, and ``p.grad`` before the step is the official
one.  The loss recorded per epoch is xe (the official log's ``xe_loss``).

The learned module is ``prompt_learner`` (``ctx`` and the class-dependent buffers
``token_prefix``/``token_suffix`` that official checkpoints carry and loading drops).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from methods.coop import CoOp
from methods.coop import PromptLearner as CoOpPromptLearner
from methods.registry import (
    Method,
    MethodError,
    TrainingError,
    encode_tokens,
    register_method,
)

GENERIC = "a photo of a {}."
# the official CUSTOM_TEMPLATES (teacher prompts and context initialisation), by catalogue name
TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": GENERIC,
    "food101": "a type of food, a photo of {}.",
    "sun397": GENERIC,
    "caltech101": GENERIC,
    "ucf101": "a photo of a person doing {}.",
    "imagenet": GENERIC,
    "imagenet_sketch": GENERIC,
    "imagenetv2": GENERIC,
    "imagenet_a": GENERIC,
    "imagenet_r": GENERIC,
}


def prograd_template(dataset) -> str:
    """The official template of the dataset being classified (a ``DatasetContext``); a
    dataset outside the official table (the toy world, a user's data) keeps its own."""
    if dataset.world != "toy" and dataset.name in TEMPLATES:
        return TEMPLATES[dataset.name]
    return dataset.template


def init_words(template: str) -> str:
    """The words that initialise the context: the official rule removes " {}." (every official
    template ends so); another template form keeps the text before its "{}"."""
    if " {}." in template:
        words = template.replace(" {}.", "")
    else:
        words = template.split("{}")[0].strip()
    return words.replace("_", " ")


def prograd_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """The official "KL" term, in the official order of operations."""
    teacher_prob = F.softmax(teacher / T, dim=-1)
    kl = -teacher_prob * F.log_softmax(student / T, -1) * T * T
    return kl.sum(1).mean()


def project(xe_grad: torch.Tensor, kl_grad: torch.Tensor, lam: float) -> torch.Tensor:
    """The official projection of one tensor's cross-entropy gradient against its KL gradient."""
    kl_unit = kl_grad / torch.linalg.norm(kl_grad)
    xe_unit = xe_grad / torch.linalg.norm(xe_grad)
    if torch.dot(xe_unit.flatten(), kl_unit.flatten()) < 0:
        return xe_grad - lam * torch.dot(xe_grad.flatten(), kl_unit.flatten()) * kl_unit
    return xe_grad


class _ProjectedGradient(torch.autograd.Function):
    """Forward: ``value`` (the cross-entropy).  Backward: each parameter receives its
    precomputed (projected) gradient times the incoming gradient."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *[(g * grad_output).to(g.dtype) for g in ctx.grads])


class PromptLearner(CoOpPromptLearner):
    """CoOp's learner with ProGrad's initialisation from the dataset's template."""

    def __init__(self, clip: nn.Module, classnames: Sequence[str], opts, template: str | None):
        nn.Module.__init__(self)
        dtype = clip.visual.conv1.weight.dtype
        width = clip.ln_final.weight.shape[0]
        self.position = str(opts.CLASS_TOKEN_POSITION)
        if self.position not in ("end", "middle", "front"):
            raise ValueError(f"CLASS_TOKEN_POSITION must be end, middle or front, not '{self.position}'.")
        self.n_ctx = int(opts.N_CTX)
        if template is not None:
            words = init_words(template)
            n_words = len(words.split(" "))
            with torch.no_grad():
                embedding = clip.token_embedding(tokenize([words]).to(clip.token_embedding.weight.device)).to(dtype)
            ctx = torch.zeros(self.n_ctx, width, dtype=dtype, device=embedding.device)
            if self.n_ctx < n_words:
                raise MethodError(f"ProGrad's N_CTX ({self.n_ctx}) must be at least the number of words of its "
                                  f"initial prompt '{words}' ({n_words}), as the official code asserts.")
            ctx[self.n_ctx - n_words:] = embedding[0, 1:1 + n_words]
            self.prefix_text = self.written_prefix(words)
        else:
            shape = (len(classnames), self.n_ctx, width) if opts.CSC else (self.n_ctx, width)
            ctx = torch.empty(*shape, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * self.n_ctx)
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("token_prefix", torch.empty(0))
        self.register_buffer("token_suffix", torch.empty(0))
        self.embed_classnames(clip, classnames)

    def written_prefix(self, words: str) -> str:
        """The official written context: M - w placeholders, then the template words."""
        n_words = len(words.split(" "))
        if self.n_ctx < n_words:
            raise MethodError(f"ProGrad's {self.n_ctx} context vectors cannot stand for the {n_words} words of "
                              f"'{words}' (the official code asserts N_CTX >= words).")
        return f"{' '.join(['X'] * (self.n_ctx - n_words))} {words}"


@register_method(
    "prograd", node="PROGRAD",
    # the official train.py defaults (its nodes are TRAINER.COOP and LOSS); the YAML sets the configs' values
    defaults=dict(N_CTX=16, CSC=False, CTX_INIT=False, PREC="fp16", CLASS_TOKEN_POSITION="end",
                  LAMBDA=1.0, T=1.0, LAMBDA_BY_SHOTS=[]),
    paper="Prompt-aligned Gradient for Prompt Tuning (ICCV 2023)", paper_name="ProGrad",
    code="the authors' Prompt-align repository, ProGrad.public/trainers/prograd.py and "
         "Dassl.ProGrad.pytorch/dassl/engine/trainer.py")
class ProGrad(CoOp):
    """CoOp's learned module, names, forward and class-name handling; the zero-shot teacher
    and the projected update."""

    trainable = ("prompt_learner.",)
    official_module = "prompt_learner"
    official_ignore = ("token_prefix", "token_suffix")

    def __init__(self, clip, classnames, cfg, dataset=None):
        Method.__init__(self, clip, classnames, cfg, dataset)
        opts = self.options
        self.T = float(opts.T)
        self.prompt_learner = PromptLearner(clip, classnames, opts, self.template if opts.CTX_INIT else None)
        self._teacher: nn.Module | None = None  # the fp32 zero-shot CLIP, while training
        self._teacher_text: torch.Tensor | None = None  # its normalised text features of the classes
        self._teacher_logits: torch.Tensor | None = None  # left by the training forward for ``loss``

    # -- the dataset and its template ----------------------------------------------------
    @property
    def template(self) -> str:
        return prograd_template(self.dataset)

    @property
    def lam(self) -> float:
        """lambda of this run: ``LAMBDA``, or the ``LAMBDA_BY_SHOTS`` entry for the run's shots."""
        by_shots = {int(k): float(v) for k, v in self.options.LAMBDA_BY_SHOTS}
        return by_shots.get(int(self.dataset.shots), float(self.options.LAMBDA))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        learner = self.prompt_learner
        if self.options.CTX_INIT:
            # the official evaluation rebuilds the learner for the dataset it classifies: the
            # written context follows that dataset's template (the learned vectors stay)
            learner.prefix_text = learner.written_prefix(init_words(self.template))
        super().set_classnames(classnames)
        self._teacher_text = None

    # -- the zero-shot teacher -------------------------------------------------------------
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            clip = self.clip
            if self.dtype in (torch.float16, torch.bfloat16):
                # officially a second CLIP loaded and cast to fp32 (the released half-precision
                # weights, widened): the same values as widening this one
                clip = copy.deepcopy(clip).float()
            self.__dict__["_teacher"] = clip  # not a submodule: no parameters, no state dict
        return self._teacher

    @torch.no_grad()
    def teacher_text(self) -> torch.Tensor:
        if self._teacher_text is None:
            teacher = self.teacher()
            prompts = [self.template.format(c.replace("_", " ")) for c in self.classnames]
            tokens = tokenize(prompts).to(teacher.logit_scale.device)
            features = encode_tokens(teacher, tokens, truncate=self.fast("TRUNCATE_TEXT"))
            self._teacher_text = features / features.norm(dim=-1, keepdim=True)
        return self._teacher_text

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher()
        image = teacher.encode_image(images.to(teacher.visual.conv1.weight.dtype))
        image = image / image.norm(dim=-1, keepdim=True)
        text = self.teacher_text().to(image.device)
        return teacher.logit_scale.exp() * image @ text.t()

    def on_train_end(self) -> None:
        # the teacher serves training only (an fp32 copy of CLIP under fp16: freed here)
        self.__dict__["_teacher"] = None
        self._teacher_text = self._teacher_logits = None

    # -- forward, loss and the projected gradient --------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits_from_features(self.image_features(images))
        if self.training:
            self._teacher_logits = self.teacher_logits(images)
        return logits

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(xe, kl) of the batch whose training forward came last."""
        teacher, self._teacher_logits = self._teacher_logits, None
        if teacher is None:
            raise RuntimeError("ProGrad.loss needs the training-mode forward of the same batch "
                               "(call model.train() and model(images) first).")
        return F.cross_entropy(logits, labels), prograd_kl(logits, teacher, self.T)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        xe, kl = self.losses(logits, labels)
        params = [p for p in self.prompt_learner.parameters() if p.requires_grad]
        if not (torch.is_grad_enabled() and logits.requires_grad and params):
            return xe
        if not torch.isfinite(kl):
            # the official trainer checks both losses before each backward pass
            raise TrainingError(f"ProGrad's KL loss is {kl.item()}. Lower OPTIM.LR or use PREC fp32.",
                                kind="non_finite_loss", loss=str(kl.item()))
        kl_grads = torch.autograd.grad(kl, params, retain_graph=True)
        xe_grads = torch.autograd.grad(xe, params)
        lam = self.lam
        grads = tuple(project(a, b, lam) for a, b in zip(xe_grads, kl_grads))
        return _ProjectedGradient.apply(xe.detach(), grads, *params)
