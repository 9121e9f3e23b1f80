"""LASP and LASP-V: a soft prompt also classified against hand-written prompts (text to text).

"LASP: Text-to-Text Optimization for Language-Aware Soft Prompting of Vision & Language
Models" (CVPR 2023, arXiv 2210.01115).  Reproduces the authors' code (the ``lasp``
repository of Adrian Bulat: ``prompting/lasp.py``, ``prompting/losses.py``, ``train.py``,
``configs/LASP/*.yaml``):

* the prompt of class c is CoOp's ``[SOS] ctx_1 .. ctx_M [name of c] . [EOS]`` (class name
  at the end), the context initialised from "a photo of a" (M = 4) or N(0, 0.02^2);
* a learned offset w (``ENABLE_CORRECTION``, zeros at the start, trained with ``TRAIN_W``)
  is added to every class's text feature before it is normalised;
* logits = CLIP's logit scale * cos(image feature, text feature);
* loss = cross-entropy + ``LASP_LOSS_WEIGHT`` * the text-to-text loss.  The text-to-text
  loss: the L hand-written templates of ``LASP_PROMPTS`` filled with each class name and
  encoded once by the frozen CLIP give h_{l,k} (normalised); the learned prompts of the same
  classes give r_i (with w, normalised).  With probability 1/2 per step (``torch.rand(1)``)
  every h gets Gaussian noise of std 0.05, after the normalisation.  The logits
  s * <r_i, h_{l,k}> (s: CLIP's logit scale) form an (L, C, C) tensor whose dimension 1 (the
  learned prompts i) is the class dimension of the cross-entropy, the target of h_{l,k}
  being i = k, averaged over l and k: each hand-written prompt is classified among the
  learned ones;
* the layer norms ``ln_1``/``ln_2`` of every image-encoder block train too
  (``FINETUNE_VIT_LN``, the paper's visual re-calibration), in their own optimiser group at
  0.1 x the learning rate; during the constant warm-up both groups run at the warm-up rate
  (the toolbox's warm-up wrapper sets every group), then each follows its own cosine;
* the class set of the text-to-text loss: LASP-V (``lasp_v``) uses every class name of the
  dataset, the base classes and, without their images, the novel ones (the paper's
  "virtual classes"): that is what the released code computes in the base-to-novel
  protocol (its logs print "Num classes used for LASP: 47" for DTD's 24 base classes).
  LASP (``lasp``) uses the training classes only: the released code's computation when
  the dataset holds no other classes, the paper's LASP without virtual classes;
* precision: ``amp`` as the official configs (fp32 weights, fp16 autocast in training, a
  GradScaler, the gradients unscaled and clipped to norm 1 over all parameters before the
  step; evaluation in fp32; the hand-written features computed once in fp32).  Under
  ``fp16`` and ``fp32`` the official loop neither scales nor clips, and neither does this
  one;
* evaluation: the learned prompts of the classes evaluated (with w), no text-to-text term.

The official loop (two optimiser groups, clipping under amp) is not the harness's shared
loop, so the method trains in its own ``fit``; the schedule is the harness's reproduction
of the toolbox's (``benchmark.trainer.epoch_learning_rates``), once per group.

Differences from the official code, none of which moves a number on ViT-B/16: w has the
dimension of the text features (the official code sizes it by the text transformer's
width, the same 512 on ViT-B/16; on a backbone where the two differ it fails); the class
order of the virtual classes is the dataset's label order (the official code takes a
Python ``set``, whose order changes with the hash seed; the loss does not depend on it);
the hand-written features are computed when the first training step needs them (they do
not change: the text encoder is frozen).

The official trainer registers its *whole* model under the name ``prompt_learner``: its
checkpoint ``prompt_learner/model.pth.tar-N`` holds ``prompt_learner.ctx``,
``prompt_learner.w``, the class-dependent buffers (``token_prefix``, ``token_suffix``,
``token_prefix_all``, ``token_suffix_all``, ``class_text_features``, dropped on load as the
official ``load_model`` drops them), the image encoder under ``image_encoder.*`` (the
trained layer norms among them), the text encoder under ``text_encoder.module.*`` and
``logit_scale``.  ``official_layout`` gives and takes that layout.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from methods.coop import PromptLearner, encode_learned_prompts
from methods.registry import (
    CONFIG_DIR,
    Method,
    TrainingError,
    copy_checked,
    encode_text_embeddings,
    encode_tokens,
    eot_length,
    register_method,
)

log = logging.getLogger(__name__)

NOISE_STD = 0.05  # official: noise added to the normalised hand-written features
NOISE_PROBABILITY = 0.5  # official: per training step, torch.rand(1) < 0.5
LN_LR_FACTOR = 0.1  # official: the image encoder's layer norms at 0.1 x OPTIM.LR
CLIP_NORM = 1.0  # official: gradient norm clipping under amp
# the official load_model drops these (with and without the "prompt_learner." prefix)
_CLASS_BUFFERS = ("token_prefix", "token_suffix", "token_prefix_all", "token_suffix_all", "class_text_features")
_IGNORED = frozenset((*_CLASS_BUFFERS, *(f"prompt_learner.{k}" for k in _CLASS_BUFFERS)))


def _is_calibrated(name: str) -> bool:
    """The official rule for the image-encoder parameters that train (``FINETUNE_VIT_LN``)."""
    return "ln_1" in name or "ln_2" in name


def text_to_text_loss(learned: torch.Tensor, handcrafted: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The official text-to-text loss: ``learned`` (C, D) normalised learned prompt features,
    ``handcrafted`` (L, C, D) hand-written ones (normalised, maybe noisy); each h_{l,k} is
    classified among the learned prompts (the cross-entropy's class dimension is dim 1 of the
    (L, C, C) logits), target k, mean over l and k."""
    logits = logit_scale.exp() * learned.unsqueeze(0) @ handcrafted.transpose(1, 2)  # [l, i, k] = <r_i, h_lk>
    labels = torch.arange(learned.shape[0], device=learned.device).unsqueeze(0).expand(handcrafted.shape[0], -1)
    return F.cross_entropy(logits, labels)


class _OfficialLayout:
    """The official checkpoint's view of a LASP model: ``state_dict()`` under the official
    key names (what ``benchmark.save_official_checkpoint`` writes)."""

    def __init__(self, method: "LASP"):
        self.method = method

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v.detach()) for k, v in self.method.official_tensors().items())


LASP_DEFAULTS = dict(
    # the official train.py defaults (extend_cfg); the YAML sets the configs' values
    ENABLE=True,  # the text-to-text loss
    LASP_PROMPTS=["a photo of {}"],  # hand-written templates of the text-to-text loss
    LASP_LOSS_WEIGHT=1.0,  # weight of the text-to-text loss
    N_CTX=16,  # random context vectors (without CTX_INIT)
    CTX_INIT="",  # words the context starts from
    PREC="amp",
    ENABLE_CORRECTION=False,  # the learned offset w added to the text features
    TRAIN_W=True,  # w trains (with ENABLE_CORRECTION)
    FINETUNE_VIT_LN=True,  # the image encoder's ln_1/ln_2 train at 0.1 x the learning rate
)


@register_method(
    "lasp", node="LASP", defaults=LASP_DEFAULTS,
    paper="LASP: Text-to-Text Optimization for Language-Aware Soft Prompting of Vision & Language Models (CVPR 2023)",
    paper_name="LASP", code="the authors' lasp repository, prompting/lasp.py")
class LASP(Method):
    """LASP: the text-to-text loss over the training classes."""

    official_module = "official_layout"
    virtual_classes = False  # LASP-V: the text-to-text loss also over the dataset's other class names

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        opts = self.options
        learner_opts = opts.clone()
        learner_opts.defrost()
        learner_opts.CSC = False
        learner_opts.CLASS_TOKEN_POSITION = "end"  # the official forward puts the name last
        self.prompt_learner = PromptLearner(clip, classnames, learner_opts)
        self.correction = bool(opts.ENABLE_CORRECTION)
        if self.correction:
            # official: zeros(1, ln_final width); here the text features' width (the same on ViT-B/16)
            width = clip.text_projection.shape[1]
            self.prompt_learner.w = nn.Parameter(torch.zeros(1, width, dtype=self.prompt_learner.ctx.dtype,
                                                             device=self.prompt_learner.ctx.device))
        self.finetune_ln = bool(opts.FINETUNE_VIT_LN)
        names = [n for n, _ in clip.visual.named_parameters() if _is_calibrated(n)]
        self.calibrated_names = [f"clip.visual.{n}" for n in names] if self.finetune_ln else []
        if self.finetune_ln:
            # the trained layer norms are CLIP's own modules; registered here as well so that the
            # harness's checkpoints (which leave out "clip.*") keep them
            owners = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))  # in block order
            self.calibration = nn.ModuleList([clip.visual.get_submodule(o) for o in owners])
        # what trains: the context, w, the layer norms (instance attributes: they follow the options)
        self.trainable = ("prompt_learner.ctx",) + (("prompt_learner.w",) if self.correction and opts.TRAIN_W else ()) \
            + tuple(self.calibrated_names)
        self.frozen_image_features = not self.finetune_ln
        self.weight = float(opts.LASP_LOSS_WEIGHT)
        self.templates = [str(t) for t in opts.LASP_PROMPTS]
        self._references: dict | None = None  # the text-to-text class set, hand-written features, tokens
        self._t2t: torch.Tensor | None = None  # the text-to-text loss of the current training step

    # -- class names -----------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.prompt_learner.embed_classnames(self.clip, classnames)
        self._references = None
        self._t2t = None

    def t2t_classnames(self) -> list[str]:
        """The classes of the text-to-text loss: the classified ones; for LASP-V every class
        name of the dataset (``DatasetContext.all_classnames``) with them."""
        names = list(self.classnames)
        if not self.virtual_classes or not self.dataset.all_classnames:
            return names
        everything = list(self.dataset.all_classnames)
        known = set(everything)
        return everything + [n for n in names if n not in known]

    @torch.no_grad()
    def references(self) -> dict:
        """The text-to-text loss's fixed inputs, computed once per class set with the frozen CLIP
        outside autocast (official: at construction, in CLIP's dtype): the hand-written
        features (L, C, D), and the learned prompts' token rows of the same classes."""
        if self._references is None:
            clip, learner = self.clip, self.prompt_learner
            device = clip.logit_scale.device
            names = [n.replace("_", " ") for n in self.t2t_classnames()]
            truncate = self.fast("TRUNCATE_TEXT")
            with torch.autocast(device.type, enabled=False):
                features = torch.stack([encode_tokens(clip, tokenize([t.format(n) for n in names]).to(device),
                                                      truncate=truncate) for t in self.templates])
                tokens = tokenize([f"{learner.prefix_text} {n}." for n in names]).to(device)
                embedding = clip.token_embedding(tokens).to(learner.ctx.dtype)
            self._references = dict(
                names=names, features=features.to(learner.ctx.dtype), tokens=tokens,
                length=eot_length(tokens) if truncate else 0,
                prefix=embedding[:, :1, :], suffix=embedding[:, 1 + learner.n_ctx:, :])
        return self._references

    # -- forward and loss -------------------------------------------------------------------
    def _offset(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.prompt_learner.w if self.correction else features

    def encode_text(self) -> torch.Tensor:
        learner = self.prompt_learner
        return self._offset(encode_learned_prompts(self, learner))

    def text_to_text(self) -> torch.Tensor:
        """The text-to-text loss of one training step (with the official random noise)."""
        refs, learner = self.references(), self.prompt_learner
        handcrafted = refs["features"] / refs["features"].norm(dim=-1, keepdim=True)
        if torch.rand(1).item() < NOISE_PROBABILITY:  # official: on the CPU generator, then noise on the device
            handcrafted = handcrafted + NOISE_STD * torch.randn_like(handcrafted)
        shared = learner.shared_prefix()  # [SOS] and the context, the same for every class name
        learned = None if shared is None else self.encode_shared(shared, refs["suffix"], refs["tokens"])
        if learned is None:
            n = refs["prefix"].shape[0]
            prompts = torch.cat([refs["prefix"], learner.ctx.unsqueeze(0).expand(n, -1, -1), refs["suffix"]], dim=1)
            learned = encode_text_embeddings(self.clip, prompts, refs["tokens"], truncate=refs["length"] or False)
        learned = self._offset(learned)
        learned = learned / learned.norm(dim=-1, keepdim=True)
        return text_to_text_loss(learned, handcrafted, self.clip.logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))

    def logits_from_features(self, image: torch.Tensor) -> torch.Tensor:
        text = self.prompt_features()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = self.clip.logit_scale.exp() * image @ text.t()
        self._t2t = self.text_to_text() if self.training and self.options.ENABLE else None
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels)
        if self.options.ENABLE:
            if self._t2t is None:
                raise RuntimeError("LASP.loss needs the training-mode forward of the same step first.")
            loss = loss + self.weight * self._t2t
        self._t2t = None
        return loss

    # -- the official loop -----------------------------------------------------------------
    def _groups(self, cfg) -> list[dict]:
        """The official optimiser groups: the image encoder's layer norms at 0.1 x LR, then the rest."""
        trained = dict(self.named_parameters())
        norms = [trained[n] for n in self.calibrated_names]
        ids = {id(p) for p in norms}
        rest = [p for p in self.trainable_parameters() if id(p) not in ids]
        groups = [{"params": norms, "lr": float(cfg.OPTIM.LR) * LN_LR_FACTOR}] if norms else []
        return groups + ([{"params": rest}] if rest else [])

    def fit(self, ctx) -> dict:
        from benchmark.precision import grad_scaler
        from benchmark.trainer import build_optimizer, epoch_learning_rates

        cfg = ctx.cfg
        lrs = epoch_learning_rates(cfg)
        groups = self._groups(cfg)
        if not lrs or not groups:
            return {"epoch_losses": [], "learning_rates": [], "steps": 0}
        scaled = cfg.clone()
        scaled.defrost()
        scaled.OPTIM.LR = float(cfg.OPTIM.LR) * LN_LR_FACTOR
        # per group: the warm-up wrapper gives every group its constant rate, the cosine each its own base
        group_lrs = [epoch_learning_rates(scaled) if self.finetune_ln and i == 0 else lrs for i in range(len(groups))]
        optimizer = build_optimizer(groups, cfg)
        scaler = grad_scaler(ctx.precision)
        loader = ctx.train_loader()
        epoch_losses, steps, last_finite = [], 0, None
        for epoch in range(len(lrs)):
            for group, rates in zip(optimizer.param_groups, group_lrs):
                group["lr"] = rates[epoch]
            self.train()
            total, count = 0.0, 0
            for batch, (images, labels) in enumerate(loader):
                images = images.to(ctx.device, non_blocking=True)
                labels = labels.to(ctx.device, non_blocking=True)
                with ctx.autocast(training=True):
                    loss = self.loss(self(images), labels)
                if not torch.isfinite(loss):
                    raise TrainingError(f"Loss is {loss.item()} at epoch {epoch + 1}, step {batch + 1}; "
                                        f"last finite loss: {last_finite}. Lower OPTIM.LR or use PREC fp32.",
                                        kind="non_finite_loss", epoch=epoch + 1, step=batch + 1,
                                        loss=str(loss.item()), last_finite_loss=last_finite)
                optimizer.zero_grad()
                if scaler is not None:  # official amp step: unscale, clip every parameter's gradient, step
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(self.parameters(), CLIP_NORM)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                last_finite = loss.item()
                total += last_finite
                count += 1
                steps += 1
            epoch_losses.append(total / max(count, 1))
            log.info("%s epoch %d/%d lr %.4e loss %.4f", self.registry_name, epoch + 1, len(lrs), lrs[epoch],
                     epoch_losses[-1])
            self.on_epoch_end(epoch, len(lrs))
        self.on_train_end()
        report = {"epoch_losses": epoch_losses, "learning_rates": lrs, "steps": steps,
                  "t2t_classes": len(self.references()["names"]) if self.options.ENABLE else 0}
        if self.finetune_ln:
            report["layer_norm_learning_rates"] = group_lrs[0]
        return report

    # -- official checkpoints ---------------------------------------------------------------
    def official_tensors(self) -> "OrderedDict[str, torch.Tensor]":
        """Every tensor of the official model's state dict, under its official name (live tensors)."""
        learner, clip = self.prompt_learner, self.clip
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        out["logit_scale"] = clip.logit_scale
        for key, value in clip.visual.state_dict(keep_vars=True).items():
            out["image_encoder." + key] = value
        for key, value in clip.state_dict(keep_vars=True).items():
            if key.startswith(("transformer.", "ln_final.")) or key in ("positional_embedding", "text_projection"):
                out["text_encoder.module." + key] = value
        out["prompt_learner.ctx"] = learner.ctx
        out["prompt_learner.token_prefix"] = learner.token_prefix
        out["prompt_learner.token_suffix"] = learner.token_suffix
        if self.options.ENABLE:
            refs = self.references()
            out["prompt_learner.class_text_features"] = refs["features"]
            out["prompt_learner.token_prefix_all"] = refs["prefix"]
            out["prompt_learner.token_suffix_all"] = refs["suffix"]
        if self.correction:
            out["prompt_learner.w"] = learner.w
        return out

    @property
    def official_layout(self) -> _OfficialLayout:
        return _OfficialLayout(self)

    def load_official_state_dict(self, state_dict: dict) -> None:
        """Load an official checkpoint's state dict: the learned tensors (required: the context,
        w, and with ``FINETUNE_VIT_LN`` the image encoder's layer norms) and the frozen CLIP
        weights it holds (the official evaluation loads them too).  The class-dependent buffers
        are dropped, as the official ``load_model`` drops them."""
        own = OrderedDict((k, v) for k, v in self.official_tensors().items() if k not in _IGNORED)
        state = {k: v for k, v in state_dict.items() if k not in _IGNORED}
        learned = ["prompt_learner.ctx"] + (["prompt_learner.w"] if self.correction else []) + \
            ["image_encoder." + n[len("clip.visual."):] for n in self.calibrated_names]
        missing = [k for k in learned if k not in state]
        copy_checked(state, own, missing, f"{type(self).__name__} as configured",
                     "CTX_INIT/N_CTX, ENABLE_CORRECTION, FINETUNE_VIT_LN and the backbone")
        self.on_weights_loaded()

    def on_weights_loaded(self) -> None:
        self._references = None


@register_method(
    "lasp_v", node="LASP", defaults=LASP_DEFAULTS,
    paper="LASP: Text-to-Text Optimization for Language-Aware Soft Prompting of Vision & Language Models "
          "(CVPR 2023), with virtual classes", paper_name="LASP-V",
    code="the authors' lasp repository, prompting/lasp.py (its base-to-novel computation)")
class LASPV(LASP):
    """LASP-V: the text-to-text loss over every class name of the dataset, the classes
    without training images included (the released code's base-to-novel computation)."""

    virtual_classes = True
    config_file = CONFIG_DIR / "lasp.yaml"  # the same official configs as LASP

