"""CLIP-LoRA: low-rank updates of the attention projections of both CLIP encoders.

"Low-Rank Few-Shot Adaptation of Vision-Language Models" (CVPR Workshops 2024, arXiv
2405.18541).  Reproduces the official code (the authors' CLIP-LoRA repository: ``main.py``,
``lora.py``, ``run_utils.py``, ``loralib/layers.py``, ``loralib/utils.py``):

* where: the attention layers of the blocks named by ``POSITION`` (``all``: every block of
  both towers; ``bottom`` 0-3, ``mid`` 4-7, ``up`` 8-11, ``half-up``, ``half-bottom``,
  ``top1``/``top2``/``top3``/``top``) in the towers named by ``ENCODER`` (``both``, ``text``,
  ``vision``).  The official vision table for ViT-L/14 stops ``all`` at block 20 of 24; kept.
* what: in each such layer the projections named by ``PARAMS`` (``q``, ``k``, ``v``; ``o``
  the output projection) become ``W x + b + s B A x`` with ``A`` (r x d_in) drawn as
  ``nn.Linear`` weights are (Kaiming-uniform, a = sqrt 5), ``B`` (d_out x r) zero, and
  ``s = ALPHA / sqrt(R)`` (the official scaling: alpha over the *square root* of the rank).
  CLIP's attention keeps q, k and v in one fused ``in_proj_weight`` (3d x d); the official
  layer copies its three row blocks into separate projections, here the same rows are read
  as slices: q = rows 0..d-1, k = rows d..2d-1, v = rows 2d..3d-1.  The attention itself is
  ``scaled_dot_product_attention`` over the heads, then the output projection.
* dropout: in training, ``DROPOUT_RATE`` dropout on the input of each low-rank branch (one
  independent mask per projection), the frozen projection seeing the undropped input; in
  evaluation the update is merged into the weight in fp32 (``W + s B A``), as the official
  ``model.eval()`` merges it.
* text: one prompt per class, "a photo of a {class}." for every dataset (the official dataset
  files keep their dataset-specific templates commented out); "_" read as a space; the text
  features are recomputed at every step.  Logits: a fixed 100 times the cosine similarities
  (not CLIP's learned logit scale).
* training (``fit``, the official loop, which counts iterations, not epochs):
  ``N_ITERS x shots`` iterations (500 x shots), batches of 32 shuffled augmented images with
  the last partial batch kept, passes over the loader repeated until the count is reached
  (the last pass stops in the middle); AdamW (lr 2e-4, weight decay 0.01, betas 0.9/0.999)
  on the low-rank matrices only; cosine schedule over all iterations down to ``ETA_MIN``
  (1e-6), stepped after every iteration; no validation, the last model is evaluated.
* precision: the official run keeps CLIP as released (fp16 weights, layer norms computing in
  fp32), the low-rank matrices in fp32, every encoder pass under fp16 autocast (evaluation
  too), the normalisation, logits and loss outside autocast on the fp16 features, and a
  GradScaler.  ``PREC fp16`` reproduces that on a GPU; on a CPU everything runs in fp32.

Official files: ``save_lora`` writes ``{"weights": {"layer_<i>": {"q_proj": {"w_lora_A",
"w_lora_B"}, ...}}, "metadata": {"r", "alpha", "encoder", "params", "position"}}`` to
``<save_path>/<backbone>/<dataset>/<K>shots/seed<S>/lora_weights.pt``, the layers numbered
text first, then vision, in block order.  ``load_official_file``/``save_official_file`` read
and write that format (``benchmark.load_official_checkpoint`` calls them), refusing a file
whose metadata differs from the model's options, as ``load_lora`` does.

Not reproduced: the official ImageNet class names are CLIP's curated list, the harness hands
every method its dataset's class names (CoOp's ``classnames.txt``); the few-shot draw is the
harness's (the official one repeats images of classes with fewer than K, the harness keeps
them once); the initial values of A depend on the random stream, not on the official draw order.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from benchmark.precision import optimizer_step
from methods.registry import Method, MethodError, TrainingError, register_method

log = logging.getLogger(__name__)

OFFICIAL_TEMPLATE = "a photo of a {}."  # every dataset file of the official code
LOGIT_SCALE = 100.0  # main.py: a fixed 100
PARAMS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}  # official module names
ENCODERS = ("both", "text", "vision")
FILENAME = "lora_weights.pt"  # run_utils.py: --filename lora_weights (".pt" added)

# loralib/utils.py: block indices (0-based) per position; the vision table is the ViT-B/16 one
POSITIONS_TEXT = {
    "top1": [11], "top2": [10, 11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7],
    "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5],
    "all": list(range(12)),
}
POSITIONS_VISION = {
    "top": [11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
    "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5], "all": list(range(12)),
}


def adapted_blocks(position: str, n_blocks: int, tower: str) -> list[int]:
    """The 0-based indices of the blocks of a tower of ``n_blocks`` that carry LoRA."""
    table = POSITIONS_TEXT if tower == "text" else POSITIONS_VISION
    if position not in table:
        raise MethodError(f"TRAINER.CLIP_LORA.POSITION '{position}' is not one of the official positions for the "
                          f"{tower} tower: {', '.join(table)}.")
    if tower == "vision" and position == "all":
        # the official table: every block of ViT-B/16 and ViT-B/32, blocks 0..20 of ViT-L/14's 24 (sic)
        return list(range(21)) if n_blocks == 24 else list(range(n_blocks))
    return [i for i in table[position] if i < n_blocks]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (the official fp32 copies of CLIP's fp16 projections)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LoRA(nn.Module):
    """The low-rank update ``s B A`` of one projection (the official ``LinearLoRA``'s parameters)."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.scaling = float(alpha) / math.sqrt(r)  # official: alpha / sqrt(r), not alpha / r
        self.w_lora_A = nn.Parameter(torch.empty(r, d_in))
        self.w_lora_B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.w_lora_A, a=math.sqrt(5))  # as nn.Linear's weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The adapted projection of ``x`` (``weight``, ``bias``: the frozen projection)."""
        if not self.training:
            # model.eval() merges the update into the (fp32) weight, outside autocast
            with torch.autocast(x.device.type, enabled=False):
                merged = _wide(weight) + (_wide(self.w_lora_B) @ _wide(self.w_lora_A)) * self.scaling
            return F.linear(x, merged.to(x.dtype), bias)
        delta = self.w_lora_B @ self.w_lora_A  # merge_BA, under the step's autocast
        if self.dropout is None:  # official: the step's weight is W + s B A, differentiable in A and B
            return F.linear(x, (_wide(weight) + delta * self.scaling).to(x.dtype), bias)
        # official: the frozen projection of x plus the update of the dropped-out x
        return F.linear(x, weight, bias) + torch.matmul(self.dropout(x), delta.transpose(0, 1).to(x.dtype)) * self.scaling


class LoRAAttention(nn.Module):
    """The updates of one attention layer, under the official names (q_proj, k_proj, v_proj, proj)."""

    def __init__(self, width: int, params: Sequence[str], r: int, alpha: float, dropout: float):
        super().__init__()
        for p in params:  # the official construction order: the order of PARAMS as given
            self.add_module(PARAMS[p], LoRA(width, width, r, alpha, dropout))

    def project(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lora = getattr(self, name, None)
        return F.linear(x, weight, bias) if lora is None else lora(x, weight, bias)

    def forward(self, mha: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of ``x`` (N, L, D) by ``mha`` with the updates applied."""
        d, heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        rows = [slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)]  # q, k, v in the fused weight
        q, k, v = (self.project(name, x, w[s], b[s] if b is not None else None)
                   for name, s in zip(("q_proj", "k_proj", "v_proj"), rows))
        n, length, _ = x.shape
        q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention's convention: True = masked out
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    attn_mask, float("-inf"))
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask)
        out = out.transpose(1, 2).reshape(n, length, d)
        return self.project("proj", out, mha.out_proj.weight, mha.out_proj.bias)


def lora_layers(width: int, n_blocks: int, indices: Sequence[int], params: Sequence[str], r: int, alpha: float,
                dropout: float) -> nn.ModuleList:
    """One ``LoRAAttention`` per block listed in ``indices``, None for the others."""
    return nn.ModuleList([LoRAAttention(width, params, r, alpha, dropout) if i in indices else None
                          for i in range(n_blocks)])


def run_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None,
              layer: LoRAAttention | None) -> torch.Tensor:
    """One residual block of CLIP, its attention adapted by ``layer`` (None: the block as it is)."""
    if layer is None:
        return block(x, attn_mask=attn_mask)
    x = x + block.ls_1(layer(block.attn, block.ln_1(x), attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _check_blocks(blocks, tower: str) -> None:
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and hasattr(block, "ls_1")
                and not hasattr(block, "ln_1_kv")):
            raise MethodError(f"CLIP-LoRA needs CLIP's standard attention blocks (nn.MultiheadAttention with a fused "
                              f"in_proj_weight); the {tower} tower has {type(block).__name__}.")


class LoRALearner(nn.Module):
    """Every LoRA update of the model: ``text`` and ``visual`` (one entry per block)."""

    def __init__(self, clip: nn.Module, opts):
        super().__init__()
        self.position, self.encoder = str(opts.POSITION), str(opts.ENCODER)
        self.params = [str(p) for p in opts.PARAMS]
        self.r, self.alpha = int(opts.R), opts.ALPHA
        if self.encoder not in ENCODERS:
            raise MethodError(f"TRAINER.CLIP_LORA.ENCODER '{self.encoder}' must be one of {', '.join(ENCODERS)}.")
        if not self.params or any(p not in PARAMS for p in self.params):
            raise MethodError(f"TRAINER.CLIP_LORA.PARAMS {self.params} must name some of q, k, v, o.")
        if self.r < 1:
            raise MethodError(f"TRAINER.CLIP_LORA.R must be at least 1, not {self.r}.")
        dropout = float(opts.DROPOUT_RATE)
        text_blocks, visual_blocks = clip.transformer.resblocks, clip.visual.transformer.resblocks
        # official construction order: the text tower, then the vision tower
        text = adapted_blocks(self.position, len(text_blocks), "text") if self.encoder in ("text", "both") else []
        visual = adapted_blocks(self.position, len(visual_blocks), "vision") if self.encoder in ("vision", "both") else []
        _check_blocks([text_blocks[i] for i in text], "text")
        _check_blocks([visual_blocks[i] for i in visual], "image")
        self.text = lora_layers(clip.transformer.width, len(text_blocks), text, self.params, self.r, self.alpha,
                                dropout)
        self.visual = lora_layers(clip.visual.transformer.width, len(visual_blocks), visual, self.params, self.r,
                                  self.alpha, dropout)

    def official_layers(self) -> list[LoRAAttention]:
        """The adapted layers in the official list's order (``layer_<i>`` of the files)."""
        return [m for m in (*self.text, *self.visual) if m is not None]

    def metadata(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "encoder": self.encoder, "params": list(self.params),
                "position": self.position}


@register_method(
    "clip_lora", node="CLIP_LORA",
    defaults=dict(PREC="fp16", POSITION="all", ENCODER="both", PARAMS=["q", "k", "v"], R=2, ALPHA=1,
                  DROPOUT_RATE=0.25, N_ITERS=500, ETA_MIN=1e-6, TEMPLATE=""),
    paper="Low-Rank Few-Shot Adaptation of Vision-Language Models (CVPR Workshops 2024)", paper_name="CLIP-LoRA",
    code="the authors' CLIP-LoRA repository, lora.py and loralib/")
class CLIPLoRA(Method):
    trainable = ("lora.",)
    official_module = "lora"

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        # the official low-rank matrices are fp32 whatever CLIP's dtype (new Linear layers)
        self.lora = LoRALearner(clip, self.options).float()
        self.register_buffer("tokens", torch.empty(0, dtype=torch.long), persistent=False)
        self._token_names: list[str] = []
        self.set_classnames(classnames)

    # -- text ---------------------------------------------------------------------------
    @property
    def template(self) -> str:
        """TEMPLATE when set; else the official "a photo of a {}." (the toy world: its caption form)."""
        if self.options.TEMPLATE:
            return str(self.options.TEMPLATE)
        return self.dataset.template if self.dataset.world == "toy" else OFFICIAL_TEMPLATE

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        prompts = [self.template.format(name.replace("_", " ")) for name in self.classnames]
        self.tokens = tokenize(prompts).to(self.clip.logit_scale.device)
        self._token_names = list(self.classnames)

    def on_weights_loaded(self) -> None:
        if self._token_names != self.classnames:  # a harness checkpoint restores its class names
            self.set_classnames(self.classnames)

    def _autocast(self):
        """The official fp16 autocast around every encoder pass (on a GPU, PREC fp16 or amp)."""
        if self.clip.logit_scale.device.type == "cuda" and self.precision in ("fp16", "amp"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _run_blocks(self, layers: nn.ModuleList, blocks, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        for block, layer in zip(blocks, layers):
            x = run_block(block, x, attn_mask, layer)
        return x

    def encode_text(self) -> torch.Tensor:
        """The text features (not normalised) of the class prompts through the adapted text tower."""
        tokens = self.tokens
        with self._autocast():
            x = self.clip.token_embedding(tokens).to(self.dtype)
            return self.encode_prompts(x, tokens, lambda blocks, h, mask: self._run_blocks(self.lora.text, blocks, h,
                                                                                            mask))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The image features (not normalised) through the adapted image tower."""
        visual = self.clip.visual
        with self._autocast():
            x = visual.conv1(images.to(self.dtype))
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                                   device=x.device)
            x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
            x = visual.ln_pre(x)
            x = self._run_blocks(self.lora.visual, visual.transformer.resblocks, x)
            return visual.ln_post(x[:, 0, :]) @ visual.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # official order: the text features first, then the images; normalisation and logits
        # outside autocast, on the encoders' (fp16) outputs
        text = self.prompt_features()
        image = self.encode_image(images)
        text = text / text.norm(dim=-1, keepdim=True)
        image = image / image.norm(dim=-1, keepdim=True)
        return LOGIT_SCALE * image @ text.t()

    # -- the official training loop -----------------------------------------------------------
    def iterations(self, n_train: int) -> tuple[int, int]:
        """(total iterations, the shots they were counted from): N_ITERS x shots."""
        shots = int(self.dataset.shots)
        if shots < 1:  # every training image: the images per class stand for the shots
            shots = max(1, round(n_train / max(len(self.classnames), 1)))
        return int(self.options.N_ITERS) * shots, shots

    def fit(self, ctx) -> dict:
        cfg, opts = ctx.cfg, self.options
        total, shots = self.iterations(len(ctx.train))
        batch = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
        loader = ctx.loader(ctx.train, augment=True, batch_size=batch, shuffle=True)  # last partial batch kept
        if total > 0 and len(loader) == 0:
            raise TrainingError("CLIP-LoRA has no training images.", kind="no_training_data")
        params = self.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=float(cfg.OPTIM.LR), weight_decay=float(cfg.OPTIM.WEIGHT_DECAY),
                                      betas=(float(cfg.OPTIM.ADAM_BETA1), float(cfg.OPTIM.ADAM_BETA2)))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(total, 1), eta_min=float(opts.ETA_MIN))
        scaler = torch.amp.GradScaler("cuda") if isinstance(self._autocast(), torch.autocast) else None
        count, losses, lrs = 0, [], []
        while count < total:
            self.train()
            seen, summed = 0, 0.0
            for images, target in loader:
                images, target = images.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True)
                loss = F.cross_entropy(self(images), target)  # outside autocast, as the official loop
                if not torch.isfinite(loss):
                    raise TrainingError(f"CLIP-LoRA loss is {loss.item()} at iteration {count + 1}; use PREC fp32.",
                                        kind="non_finite_loss", step=count + 1, loss=str(loss.item()))
                optimizer_step(loss, optimizer, scaler)
                scheduler.step()  # every iteration, also those the scaler skips
                summed += loss.item() * target.shape[0]
                seen += target.shape[0]
                count += 1
                if count == total:
                    break
            losses.append(summed / max(seen, 1))
            lrs.append(scheduler.get_last_lr()[0])
        self.eval()
        log.info("clip_lora: %d iterations (%d x %d shots), last loss %.4f", count, int(opts.N_ITERS), shots,
                 losses[-1] if losses else float("nan"))
        return {"iterations": count, "shots_counted": shots, "steps": count, "epoch_losses": losses,
                "learning_rates": lrs, "batch_size": batch, "trainable_params": sum(p.numel() for p in params)}

    # -- official files -------------------------------------------------------------------------
    def save_official_file(self, path: str | Path, epoch: int | None = None) -> Path:
        """Write the official ``save_lora`` file: ``path`` itself when it ends in .pt, else
        ``path/lora_weights.pt``."""
        path = Path(path)
        if path.suffix != ".pt":
            path = path / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {}
        for i, layer in enumerate(self.lora.official_layers()):
            weights[f"layer_{i}"] = {name: {"w_lora_A": m.w_lora_A.detach().cpu().clone(),
                                            "w_lora_B": m.w_lora_B.detach().cpu().clone()}
                                     for name, m in layer.named_children()}
        torch.save({"weights": weights, "metadata": self.lora.metadata()}, path)
        return path

    def load_official_file(self, path: str | Path) -> dict:
        """Read an official ``save_lora`` file (or the folder holding ``lora_weights.pt``); its
        metadata must match the model's options, as the official ``load_lora`` demands."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist. The official code writes "
                                    f"<save_path>/<backbone>/<dataset>/<K>shots/seed<S>/{FILENAME}.")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MethodError(f"{path} is not a CLIP-LoRA file that can be read safely: {exc}") from exc
        if not isinstance(data, dict) or "weights" not in data or "metadata" not in data:
            raise MethodError(f"{path} is not an official CLIP-LoRA file (expected 'weights' and 'metadata').")
        meta, own = dict(data["metadata"]), self.lora.metadata()
        for key in ("r", "alpha", "encoder", "params", "position"):
            if meta.get(key) != own[key]:
                raise MethodError(f"{path}: {key} mismatch: the model has {own[key]!r}, the file {meta.get(key)!r}. "
                                  f"Set TRAINER.CLIP_LORA.{key.upper()} as in the run that wrote it.")
        layers = self.lora.official_layers()
        weights = data["weights"]
        if len(weights) != len(layers):
            raise MethodError(f"{path} holds {len(weights)} layers, the model {len(layers)}: another backbone?")
        with torch.no_grad():
            for i, layer in enumerate(layers):
                stored = weights[f"layer_{i}"]
                for name, m in layer.named_children():
                    for key in ("w_lora_A", "w_lora_B"):
                        value, target = stored[name][key], getattr(m, key)
                        if tuple(value.shape) != tuple(target.shape):
                            raise MethodError(f"{path}: layer_{i}.{name}.{key} has shape {tuple(value.shape)}, the "
                                              f"model {tuple(target.shape)}: another backbone?")
                        target.copy_(value.to(target.dtype))
        self.on_weights_loaded()
        return {"metadata": meta, "layers": len(layers)}
