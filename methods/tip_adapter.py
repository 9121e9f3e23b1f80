"""Tip-Adapter and Tip-Adapter-F: a key-value cache of few-shot image features beside CLIP.

"Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (ECCV 2022,
arXiv 2207.09519).  Reproduces the official code base (``main.py``, ``main_imagenet.py``,
``utils.py``, ``configs/<dataset>.yaml``):

* text classifier W: for each class, the dataset's templates (one per dataset; the seven
  ImageNet templates for ImageNet) filled with the name ("_" -> " "), encoded, each
  embedding L2-normalised, averaged over the templates and normalised again;
* cache: ``AUGMENT_EPOCH`` passes over the few-shot training images in list order, each
  image freshly augmented (RandomResizedCrop with scale (0.5, 1), bicubic, horizontal flip,
  CLIP normalisation); the keys are the *raw* image features averaged over the passes and
  then L2-normalised (the official code normalises only after the mean); the values are the
  one-hot labels;
* logits of a normalised test feature f: ``100 f W^T + alpha * exp(-(beta - beta f K^T)) V``
  (the fixed factor 100, not CLIP's logit scale; the cache term written as the official
  code writes it);
* alpha and beta: a grid search, ``SEARCH_STEP`` values from 0.1 up to (not including)
  ``SEARCH_SCALE`` for beta and for alpha, beta in the outer loop, keeping the first pair
  whose accuracy is strictly higher (starting from 0 %, so an all-wrong split keeps 0, 0);
* Tip-Adapter-F: a bias-free linear layer initialised with the keys (weight = K, one row
  per cached image) is fine-tuned with the cross-entropy of the logits above at the
  initial alpha and beta, by AdamW (eps 1e-4, torch's default weight decay 0.01) with a
  cosine schedule stepped every iteration over ``MAX_EPOCH * len(loader)`` steps, batches of
  256 shuffled, augmented images (the last, partial batch kept); CLIP stays frozen;
* precision: the official code runs the released half-precision CLIP, so features, keys,
  values, the classifier and the fine-tuned keys are fp16 (``PREC fp16``); on a CPU fp32.

Deviations (selection never looks at test data):
* the official code picks Tip-Adapter-F's best epoch by its *test* accuracy, and on ImageNet
  (no validation split) searches alpha and beta on the test set.  Here the best epoch and
  the search use the validation split given to ``fit`` (``ctx.val``).  Where that split is
  the test set (ImageNet, whose val is its test set in the harness) or is empty, nothing is
  selected: the initial alpha and beta and the last epoch are kept, and the record says so.
* The official search uses the whole validation split; the harness gives the few-shot one
  (``min(shots, 4)`` images per class, as the CoOp protocol draws it).

Other classes (``set_classnames``): the values are one-hot over the *names* of the classes
the cache was built from.  For other classes the values are remapped by name; a class the
cache has no images of gets no cache term, so on base-to-novel's novel classes Tip-Adapter
and Tip-Adapter-F are exactly their zero-shot classifier (the template ensemble).

Official files: the official code writes ``caches/<dataset>/keys_<K>shots.pt`` (the keys,
shape (D, N)), ``values_<K>shots.pt`` (one-hot, (N, C), fp16) and, for Tip-Adapter-F,
``best_F_<K>shots.pt`` (the fine-tuned adapter weight, (N, D)).  ``load_official_file`` and
``save_official_file`` read and write that layout; the official code does not store alpha
and beta, so a loaded model uses the initial values until they are set.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, MethodError, TrainingError, encode_tokens, register_method

log = logging.getLogger(__name__)

LOGIT_FACTOR = 100.0  # the official code multiplies the cosine similarities by a fixed 100

IMAGENET_TEMPLATES = (  # the official ImageNet prompt ensemble
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

_COMMON_DEFAULTS = dict(
    PREC="fp16",  # the released half-precision CLIP, as the official code runs it
    AUGMENT_EPOCH=10,  # augmented passes averaged into the cache keys
    CACHE_BATCH_SIZE=256,  # the official cache loader (in order, last batch kept)
    INIT_BETA=1.0,  # sharpness of the affinities before the search
    INIT_ALPHA=1.17,  # weight of the cache term before the search
    SEARCH_HP=True,  # search alpha and beta on the validation split
    SEARCH_SCALE=[7.0, 3.0],  # upper ends (excluded) of the beta and alpha grids
    SEARCH_STEP=[200, 20],  # number of beta and alpha values
    TEMPLATES=[],  # override the prompt templates; empty = the dataset's official ones
)


# -- the official computations, as functions -------------------------------------------------
def tip_templates(dataset, override: Sequence[str] = ()) -> list[str]:
    """The prompt templates of the dataset being classified (a ``DatasetContext``): the
    seven-template ensemble for ImageNet, the dataset's single template otherwise (the toy
    world keeps its own caption form)."""
    if override:
        return list(override)
    if dataset.name == "imagenet" and dataset.world != "toy":
        return list(IMAGENET_TEMPLATES)
    return [dataset.template]


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_classifier(clip: nn.Module, classnames: Sequence[str], templates: Sequence[str],
                    chunk: int = 1000, *, truncate: bool = False) -> torch.Tensor:
    """(C, D): per class, the mean of the normalised template embeddings, normalised."""
    device = clip.logit_scale.device
    texts = [t.format(name.replace("_", " ")) for name in classnames for t in templates]
    parts = [encode_tokens(clip, tokenize(texts[i:i + chunk]).to(device), truncate=truncate)
             for i in range(0, len(texts), chunk)]
    emb = torch.cat(parts).view(len(classnames), len(templates), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    mean = emb.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def search_grid(scale: float, steps: int) -> list[float]:
    """The official grid: ``steps`` values from 0.1 towards ``scale`` (excluded)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(int(steps))]


def cache_term(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - affinity)) @ values, written as the official code writes it."""
    return ((-1) * (beta - beta * affinity)).exp() @ values


def tip_logits(features: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: float, beta: float) -> torch.Tensor:
    """Logits of L2-normalised features; keys (N, D) (or the fine-tuned adapter weight)."""
    clip_logits = LOGIT_FACTOR * features @ text.t()
    if keys.shape[0] == 0:
        return clip_logits
    return clip_logits + cache_term(features @ keys.t(), values, beta) * alpha


@torch.no_grad()
def search_alpha_beta(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, scale: Sequence[float], steps: Sequence[int]) -> dict:
    """The official search: beta outer, alpha inner, first strictly better accuracy wins."""
    betas, alphas = search_grid(scale[0], steps[0]), search_grid(scale[1], steps[1])
    clip_logits = LOGIT_FACTOR * features @ text.t()
    affinity = features @ keys.t()
    alpha_t = torch.tensor(alphas, dtype=clip_logits.dtype, device=clip_logits.device)[:, None, None]
    best = {"beta": 0.0, "alpha": 0.0, "correct": 0}
    for beta in betas:
        cache = cache_term(affinity, values, beta)
        preds = (clip_logits.unsqueeze(0) + cache.unsqueeze(0) * alpha_t).argmax(dim=-1)
        correct = (preds == labels.unsqueeze(0)).sum(dim=-1).tolist()
        for alpha, c in zip(alphas, correct):
            if c > best["correct"]:
                best = {"beta": beta, "alpha": alpha, "correct": c}
    n = int(labels.numel())
    best["accuracy"] = 100.0 * best["correct"] / n if n else float("nan")
    best["beta_grid"], best["alpha_grid"] = betas, alphas
    return best


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(dim=-1) == labels).sum()) / max(int(labels.numel()), 1)


def _shots_of(path: Path) -> int | None:
    match = re.search(r"(\d+)shots\.pt$", path.name)
    return int(match.group(1)) if match else None


# -- the method ---------------------------------------------------------------------------------
@register_method("tip_adapter", node="TIP_ADAPTER", defaults=dict(_COMMON_DEFAULTS),
                 paper="Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification (ECCV 2022)",
                 paper_name="Tip-Adapter", code="the official Tip-Adapter code base, main.py and utils.py")
class TipAdapter(Method):
    """Zero-shot logits plus the cache term; ``fit`` builds the cache and searches alpha, beta."""

    frozen_image_features = True

    trainable = ()  # nothing trains in the trainer's loop; the cache is built in ``fit``
    finetune = False

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        opts = self.options
        self.alpha, self.beta = float(opts.INIT_ALPHA), float(opts.INIT_BETA)
        self.cache_classnames: list[str] = []  # the classes the values are one-hot over
        text = clip_classifier(clip, self.classnames, self.templates, truncate=self.fast("TRUNCATE_TEXT"))
        self._text_classnames = list(self.classnames)
        dim = text.shape[1]
        self.register_buffer("text_weights", text, persistent=False)
        self.register_buffer("cache_keys", torch.empty(0, dim, dtype=text.dtype, device=text.device))
        self.register_buffer("cache_labels", torch.empty(0, dtype=torch.long, device=text.device))
        # Tip-Adapter-F's fine-tuned keys (the official adapter weight); empty = use the keys
        self.register_buffer("adapter_weight", torch.empty(0, dim, dtype=text.dtype, device=text.device))
        self.register_buffer("cache_values", torch.empty(0, len(self.classnames), dtype=text.dtype,
                                                         device=text.device), persistent=False)

    # -- inference ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return _normalized(self.image_features(images))

    @property
    def keys(self) -> torch.Tensor:
        """The keys the logits use: the fine-tuned ones where there are, else the cache's."""
        return self.adapter_weight if self.adapter_weight.shape[0] else self.cache_keys

    def logits_of(self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None,
                  keys: torch.Tensor | None = None) -> torch.Tensor:
        keys = self.keys if keys is None else keys
        text = self.text_weights
        features = features.to(text.dtype)
        return tip_logits(features, text, keys.to(text.dtype), self.cache_values.to(text.dtype),
                          self.alpha if alpha is None else alpha, self.beta if beta is None else beta)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits_of(_normalized(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_of(self.encode(images))

    # -- class names ---------------------------------------------------------------------------
    @property
    def templates(self) -> list[str]:
        return tip_templates(self.dataset, list(self.options.TEMPLATES))

    def _classifier(self) -> torch.Tensor:
        return clip_classifier(self.clip, self.classnames, self.templates, truncate=self.fast("TRUNCATE_TEXT"))

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self.text_weights = self._classifier().to(self.text_weights.dtype)
        self._text_classnames = list(self.classnames)
        self._remap_values()

    def _remap_values(self) -> None:
        """One-hot values over the current classes, matched by class name."""
        n, c = self.cache_labels.shape[0], len(self.classnames)
        device, dtype = self.text_weights.device, self.text_weights.dtype
        labels = self.cache_labels.to(device)
        if n == 0:
            values = torch.zeros(0, c, dtype=dtype, device=device)
        elif self.cache_classnames == self.classnames:
            values = F.one_hot(labels, c).to(dtype)
        else:
            columns: dict[str, list[int]] = {}
            for j, name in enumerate(self.classnames):
                columns.setdefault(name, []).append(j)
            table = torch.zeros(len(self.cache_classnames), c, dtype=dtype, device=device)
            for i, name in enumerate(self.cache_classnames):
                for j in columns.get(name, []):
                    table[i, j] = 1
            values = table[labels]
        self.cache_values = values

    def get_extra_state(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "cache_classnames": list(self.cache_classnames)}

    def set_extra_state(self, state: dict) -> None:
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.cache_classnames = list(state["cache_classnames"])

    def on_weights_loaded(self) -> None:
        if self._text_classnames != self.classnames:
            with torch.no_grad():
                self.text_weights = self._classifier().to(self.text_weights.dtype)
            self._text_classnames = list(self.classnames)
        self._remap_values()

    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str] | None = None,
                  adapter_weight: torch.Tensor | None = None) -> None:
        """Install a cache: keys (N, D) normalised, labels (N,) indexing ``classnames``
        (default: the current class names)."""
        device, dtype = self.text_weights.device, self.text_weights.dtype
        self.cache_classnames = list(self.classnames if classnames is None else classnames)
        if labels.numel() and int(labels.max()) >= len(self.cache_classnames):
            raise MethodError(f"Cache labels go up to {int(labels.max())} but only "
                              f"{len(self.cache_classnames)} class names were given.")
        self.cache_keys = keys.detach().to(device=device, dtype=dtype).contiguous()
        self.cache_labels = labels.detach().to(device=device, dtype=torch.long)
        weight = torch.empty(0, keys.shape[1]) if adapter_weight is None else adapter_weight.detach()
        self.adapter_weight = weight.to(device=device, dtype=dtype).contiguous()
        self._remap_values()

    # -- fitting -------------------------------------------------------------------------------
    @torch.no_grad()
    def build_cache(self, ctx) -> dict:
        """The official cache: raw features of AUGMENT_EPOCH augmented passes (in list order),
        averaged, then normalised; labels of the first pass."""
        opts = self.options
        # the official cache loader: the train transforms (the YAML sets the official crop scale), in order
        loader = ctx.loader(ctx.train, augment=True, batch_size=int(opts.CACHE_BATCH_SIZE), shuffle=False)
        passes, labels = [], []
        self.eval()
        for epoch in range(int(opts.AUGMENT_EPOCH)):
            features = []
            for images, target in loader:
                with ctx.autocast(training=False):
                    features.append(self.clip.encode_image(images.to(ctx.device).to(self.dtype)))
                if epoch == 0:
                    labels.append(target)
            passes.append(torch.cat(features).unsqueeze(0))
        keys = torch.cat(passes).mean(dim=0)
        keys = keys / keys.norm(dim=-1, keepdim=True)
        self.set_cache(keys, torch.cat(labels))
        return {"augment_epoch": int(opts.AUGMENT_EPOCH), "cache_size": int(keys.shape[0])}

    def _selection_features(self, ctx) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """Normalised features and labels of the split used to select, or a reason not to."""
        if self.dataset.val_is_test:
            return None, None, "the dataset has no validation split (its val is the test set)"
        if not ctx.val:
            return None, None, "no validation images"
        features = _normalized(ctx.frozen_features(self, ctx.val)).to(self.text_weights.dtype)
        labels = torch.tensor([d.label for d in ctx.val], dtype=torch.long, device=ctx.device)
        return features, labels, ""

    def _search(self, features, labels, keys, report: dict) -> None:
        opts = self.options
        init = (float(opts.INIT_ALPHA), float(opts.INIT_BETA))
        report["init_alpha"], report["init_beta"] = init
        if features is None or not opts.SEARCH_HP:
            self.alpha, self.beta = init
            report.update(alpha=self.alpha, beta=self.beta, searched=False)
            return
        with torch.no_grad():
            report["val_accuracy_zero_shot"] = _accuracy(LOGIT_FACTOR * features @ self.text_weights.t(), labels)
            report["val_accuracy_init"] = _accuracy(self.logits_of(features, *init, keys=keys), labels)
            best = search_alpha_beta(features, labels, self.text_weights, keys.to(features.dtype),
                                     self.cache_values, list(opts.SEARCH_SCALE), list(opts.SEARCH_STEP))
        self.alpha, self.beta = float(best["alpha"]), float(best["beta"])
        report.update(alpha=self.alpha, beta=self.beta, searched=True, val_accuracy_best=best["accuracy"],
                      search={"scale": [float(s) for s in opts.SEARCH_SCALE],
                              "step": [int(s) for s in opts.SEARCH_STEP],
                              "beta_grid": [best["beta_grid"][0], best["beta_grid"][-1], len(best["beta_grid"])],
                              "alpha_grid": [best["alpha_grid"][0], best["alpha_grid"][-1],
                                             len(best["alpha_grid"])]})

    def fit(self, ctx) -> dict:
        report = self.build_cache(ctx)
        features, labels, reason = self._selection_features(ctx)
        report["selected_on"] = "val" if features is not None else None
        if reason:
            report["selection_note"] = f"no selection: {reason}; the initial alpha and beta are kept"
        else:
            report["n_val"] = int(labels.numel())
        self._search(features, labels, self.cache_keys, report)
        log.info("tip_adapter: alpha %.3f beta %.3f (%s)", self.alpha, self.beta, report["selected_on"] or reason)
        return report

    # -- official files ------------------------------------------------------------------------
    def _shots(self, shots: int | None) -> int:
        if shots:
            return int(shots)
        configured = int(self.dataset.shots)
        if configured > 0:
            return configured
        n, c = self.cache_labels.shape[0], max(len(self.cache_classnames), 1)
        return max(n // c, 1)

    def save_official_file(self, path: str | Path, epoch: int | None = None, shots: int | None = None) -> Path:
        """Write the official cache files into the directory ``path`` (``caches/<dataset>``):
        ``keys_<K>shots.pt`` (D, N), ``values_<K>shots.pt`` (N, C) fp16 one-hot and, for
        Tip-Adapter-F, ``best_F_<K>shots.pt`` (N, D).  Returns the main file."""
        if self.cache_keys.shape[0] == 0:
            raise MethodError(f"{type(self).__name__} has no cache yet: call fit (or load one) first.")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        k = self._shots(shots)
        keys_file = directory / f"keys_{k}shots.pt"
        torch.save(self.cache_keys.detach().cpu().t(), keys_file)
        values = F.one_hot(self.cache_labels.cpu(), len(self.cache_classnames)).half()
        torch.save(values, directory / f"values_{k}shots.pt")
        if self.finetune:
            best = directory / f"best_F_{k}shots.pt"
            torch.save(nn.Parameter(self.keys.detach().cpu().clone()), best)
            return best
        return keys_file

    def load_official_file(self, path: str | Path, shots: int | None = None) -> dict:
        """Read official cache files: ``path`` is the cache directory or one of its files.

        The values' columns are the model's current class names in label order (the classes
        the official run was trained on).  alpha and beta stay at the initial values."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        k = shots or (None if path.is_dir() else _shots_of(path))
        if k is None:
            found = sorted(directory.glob("keys_*shots.pt"))
            if len(found) != 1 and int(self.dataset.shots) <= 0:
                raise FileNotFoundError(f"Cannot tell which keys_<K>shots.pt of {directory} to read "
                                        f"(found {[p.name for p in found]}); pass shots=K.")
            k = _shots_of(found[0]) if len(found) == 1 else int(self.dataset.shots)

        def read(name: str) -> torch.Tensor:
            file = directory / name
            if not file.is_file():
                raise FileNotFoundError(f"{file} does not exist. The official code writes keys_<K>shots.pt, "
                                        f"values_<K>shots.pt and (Tip-Adapter-F) best_F_<K>shots.pt "
                                        f"into caches/<dataset>/.")
            return torch.load(file, map_location="cpu", weights_only=True).detach()

        keys, values = read(f"keys_{k}shots.pt"), read(f"values_{k}shots.pt")
        if keys.dim() != 2 or values.dim() != 2 or keys.shape[1] != values.shape[0]:
            raise MethodError(f"Keys {tuple(keys.shape)} and values {tuple(values.shape)} do not form a cache "
                              f"(expected (D, N) and (N, C)).")
        if keys.shape[0] != self.text_weights.shape[1]:
            raise MethodError(f"The keys have dimension {keys.shape[0]}, the backbone {self.text_weights.shape[1]}: "
                              f"they were written with another backbone.")
        if values.shape[1] > len(self.classnames):
            raise MethodError(f"The values cover {values.shape[1]} classes, the model {len(self.classnames)}: "
                              f"build the model with the training classes of the official run.")
        weight = read(f"best_F_{k}shots.pt") if self.finetune else None
        if weight is not None and tuple(weight.shape) != (keys.shape[1], keys.shape[0]):
            raise MethodError(f"best_F_{k}shots.pt has shape {tuple(weight.shape)}, expected "
                              f"{(keys.shape[1], keys.shape[0])}.")
        self.set_cache(keys.t().float(), values.float().argmax(dim=1), self.classnames, weight)
        self.alpha, self.beta = float(self.options.INIT_ALPHA), float(self.options.INIT_BETA)
        return {"shots": k, "cache_size": int(keys.shape[1]), "alpha": self.alpha, "beta": self.beta}


@register_method("tip_adapter_f", node="TIP_ADAPTER_F", defaults=dict(_COMMON_DEFAULTS, ADAM_EPS=1e-4),
                 paper="Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification (ECCV 2022)",
                 paper_name="Tip-Adapter-F", code="the official Tip-Adapter code base, main.py and utils.py")
class TipAdapterF(TipAdapter):
    """Tip-Adapter with the cache keys fine-tuned (the official ``run_tip_adapter_F``)."""

    trainable = ()  # the adapter is created and trained inside ``fit``, not by the trainer's loop
    finetune = True

    def init_adapter(self) -> nn.Linear:
        """The official adapter: Linear(D -> N, no bias) whose weight is the keys (N, D)."""
        n, d = self.cache_keys.shape
        adapter = nn.Linear(d, n, bias=False).to(device=self.cache_keys.device, dtype=self.cache_keys.dtype)
        adapter.weight = nn.Parameter(self.cache_keys.clone())
        return adapter

    def fit(self, ctx) -> dict:
        cfg, opts = ctx.cfg, self.options
        report = self.build_cache(ctx)
        features, labels, reason = self._selection_features(ctx)
        report["selected_on"] = "val" if features is not None else None
        if reason:
            report["selection_note"] = (f"no selection: {reason}; the last epoch and the initial alpha "
                                        f"and beta are kept")
        else:
            report["n_val"] = int(labels.numel())

        adapter = self.init_adapter()
        loader = ctx.loader(ctx.train, augment=True, batch_size=int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE), shuffle=True)
        epochs = int(cfg.OPTIM.MAX_EPOCH)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=float(cfg.OPTIM.LR), eps=float(opts.ADAM_EPS),
                                      weight_decay=float(cfg.OPTIM.WEIGHT_DECAY),
                                      betas=(float(cfg.OPTIM.ADAM_BETA1), float(cfg.OPTIM.ADAM_BETA2)))
        # the official schedule: cosine over every iteration of every epoch, stepped per batch
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * len(loader), 1))
        alpha, beta = float(opts.INIT_ALPHA), float(opts.INIT_BETA)
        losses, val_accs, lrs = [], [], []
        best_acc, best_epoch, best_weight = -math.inf, epochs - 1, None
        for epoch in range(epochs):
            total, count = 0.0, 0
            for images, target in loader:
                with torch.no_grad(), ctx.autocast(training=False):
                    feats = self.encode(images.to(ctx.device)).to(adapter.weight.dtype)
                logits = self.logits_of(feats, alpha, beta, keys=adapter.weight)
                loss = F.cross_entropy(logits, target.to(ctx.device))
                if not torch.isfinite(loss):
                    raise TrainingError(f"Tip-Adapter-F loss is {loss.item()} at epoch {epoch + 1}; "
                                        f"lower OPTIM.LR or use PREC fp32.")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item()
                count += 1
            losses.append(total / max(count, 1))
            lrs.append(scheduler.get_last_lr()[0])
            if features is not None:
                with torch.no_grad():
                    acc = _accuracy(self.logits_of(features, alpha, beta, keys=adapter.weight), labels)
                val_accs.append(acc)
                # the official criterion (there on test accuracy); starting below 0 % keeps an
                # all-wrong run on its first epoch where the official code would find no file
                if acc > best_acc:
                    best_acc, best_epoch = acc, epoch
                    best_weight = adapter.weight.detach().clone()
            log.info("tip_adapter_f epoch %d/%d loss %.4f lr %.3e%s", epoch + 1, epochs, losses[-1], lrs[-1],
                     f" val {val_accs[-1]:.2f}" if val_accs else "")
        weight = best_weight if best_weight is not None else adapter.weight.detach().clone()
        self.adapter_weight = weight
        report.update(epochs=epochs, best_epoch=best_epoch if epochs else None, epoch_losses=losses,
                      epoch_val_accuracy=val_accs, learning_rates=lrs, steps=epochs * len(loader),
                      batch_size=int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE), lr=float(cfg.OPTIM.LR),
                      trainable_params=adapter.weight.numel())
        self._search(features, labels, self.adapter_weight, report)
        log.info("tip_adapter_f: best epoch %s, alpha %.3f beta %.3f", report["best_epoch"], self.alpha, self.beta)
        return report
