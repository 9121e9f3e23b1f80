"""The method registry: a method is an ``nn.Module`` registered under a short name.

    @register_method("coop", node="COOP", defaults=dict(N_CTX=16, PREC="fp16"), ...)
    class CoOp(Method): ...

The registry key, the file name and the YAML name agree (``coop``, ``methods/coop.py``,
``methods/configs/coop.yaml``).  A method's ``TRAINER.<NODE>`` defaults sit beside its
code and are added to the config when the method registers.  Methods from outside the
repository register the same way: import their module (``--plugin``) or expose it under
the ``clip_fewshot_benchmark.methods`` entry point group.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from benchmark import speed
from methods.text_prefix import encode_shared_prefix, supports_shared_prefix

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN_MODULES = ("methods.zsclip", "methods.coop", "methods.cocoop", "methods.mma", "methods.maple",
                   "methods.linear_probe", "methods.tip_adapter", "methods.kgcoop", "methods.clip_adapter",
                   "methods.promptsrc")
ENTRY_POINT_GROUP = "clip_fewshot_benchmark.methods"


class MethodError(ValueError):
    """An unknown method name or a method that cannot be built as asked."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); its message and ``details``
    (what failed, where) are stored in the run's failure record.  Raised by the trainer and
    by methods with a loop of their own."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


class ClassesNotSupported(MethodError):
    """Raised by ``set_classnames`` when a method cannot classify the given classes at all
    (a linear probe has weights only for the classes it was trained on).  The trainer
    records that evaluation as not applicable; tables show it as missing."""


@dataclass
class MethodInfo:
    name: str  # registry key, e.g. "mma"
    cls: type
    node: str  # config node under TRAINER, e.g. "MMADAPTER" (the official name)
    defaults: dict  # TRAINER.<node>.* defaults
    paper: str = ""  # title and venue
    paper_name: str = ""  # spelling in the published tables, e.g. "MMA", "CLIP"
    code: str = ""  # where the official implementation lives
    version: int = 1  # bump whenever a change moves numbers; stored in every record
    config_file: Path | None = None
    extra: dict = field(default_factory=dict)
    # options added after records existed, with the value that gives the earlier computation:
    # at that value they are left out of a run's identity, so earlier records stay finished
    neutral: dict = field(default_factory=dict)
    # options counted in epochs of the schedule (e.g. PromptSRC's Gaussian over epochs): where
    # a schedule is shortened (the toy world's rule, benchmark.protocols.toy_epochs) they are
    # scaled with it, so that they keep their place in training
    epoch_options: tuple[str, ...] = ()


_REGISTRY: dict[str, MethodInfo] = {}
_LOADED = False


def register_method(name: str, *, node: str | None = None, defaults: dict | None = None,
                    paper: str = "", paper_name: str = "", code: str = "",
                    version: int = 1, neutral: dict | None = None,
                    epoch_options: Sequence[str] = ()) -> Callable[[type], type]:
    """Class decorator adding a method to the registry under ``name``.  ``neutral``: options
    (keys of ``defaults``) added later, with the value that reproduces the computation of
    records made before them; at that value they do not enter a run's identity."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise MethodError(f"Method name '{name}' is registered twice "
                              f"({_REGISTRY[name].cls.__module__} and {cls.__module__}).")
        yaml_file = CONFIG_DIR / f"{name}.yaml"
        own_yaml = Path(getattr(cls, "config_file", "") or yaml_file)
        _REGISTRY[name] = MethodInfo(
            name=name, cls=cls, node=node or name.upper(), defaults=dict(defaults or {}),
            paper=paper, paper_name=paper_name or name, code=code, version=version,
            config_file=own_yaml if own_yaml.is_file() else None, neutral=dict(neutral or {}),
            epoch_options=tuple(epoch_options))
        cls.registry_name = name
        cls.node = node or name.upper()
        return cls

    return decorate


def _discovered_modules() -> tuple[str, ...]:
    """Method files added to ``methods/`` (by ``run.py new-method`` or by hand) register
    themselves: every module there is imported, the built-in ones first."""
    import pkgutil

    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in ("registry", "__init__"))
    return tuple(f"methods.{n}" for n in names if f"methods.{n}" not in BUILTIN_MODULES)


def load_plugins(modules: Sequence[str] = ()) -> None:
    """Import the built-in methods, entry-point plugins and ``--plugin`` modules."""
    global _LOADED
    if not _LOADED:
        for module in BUILTIN_MODULES + _discovered_modules():
            importlib.import_module(module)
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
        _LOADED = True
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MethodError(f"Cannot import plugin module '{module}': {exc}. Give a module "
                              f"importable from the current directory or PYTHONPATH.") from exc


def list_methods() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodInfo:
    load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise MethodError(f"Unknown method '{name}'.{hint} Known methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def paper_name(name: str) -> str:
    """The method's spelling in the published tables (``MethodInfo.paper_name``); a name
    that is not registered (records of a removed plugin) as it is."""
    try:
        return get_method(name).paper_name
    except ValueError:
        return name


def add_method_defaults(cfg: CN) -> None:
    """Add every registered method's TRAINER.<NODE> defaults to cfg (before merging YAML)."""
    load_plugins()
    for info in _REGISTRY.values():
        if info.node not in cfg.TRAINER:
            cfg.TRAINER[info.node] = CN(dict(info.defaults))


def build_method(name: str, clip: nn.Module, classnames: Sequence[str], cfg: CN,
                 dataset: "DatasetContext | None" = None) -> "Method":
    """Build a registered method around a CLIP model for the given class names, told
    what it classifies (``dataset``; by default the class names with the generic template)."""
    info = get_method(name)
    if not classnames:
        raise MethodError(f"Method '{name}' needs at least one class name; got an empty list.")
    if dataset is None:
        dataset = DatasetContext(tuple(classnames))
    elif tuple(dataset.classnames) != tuple(classnames):
        raise MethodError(f"build_method('{name}'): the class names differ from those of the dataset it is "
                          f"told about ({len(classnames)} against {len(dataset.classnames)}).")
    if "dataset" not in inspect.signature(info.cls.__init__).parameters:
        raise MethodError(f"{info.cls.__name__}.__init__ must accept the dataset it classifies: "
                          "def __init__(self, clip, classnames, cfg, dataset=None), passing dataset on to "
                          "Method.__init__ (see methods/zsclip.py).")
    # CLIP is frozen before the method is built, so that whatever its constructor computes
    # from CLIP (text features of hand-written prompts, class embeddings) runs as it runs
    # later, when the class names change: a weight that requires gradients makes the
    # batched products take another kernel path (even under no_grad), and the features
    # differed in their last bits.  ``freeze`` then sets what the method trains.
    flags = [(p, p.requires_grad) for p in clip.parameters()]
    clip.requires_grad_(False)
    try:
        model = info.cls(clip, list(classnames), cfg, dataset=dataset)
    except BaseException:
        for param, flag in flags:  # a method that cannot be built leaves CLIP as it was
            param.requires_grad_(flag)
        raise
    model.freeze()
    return model


def _same_key(a: tuple, b: tuple) -> bool:
    """Keys of ``Method._text_key``: the tensors compared by identity (an id or an address
    can be reused by a new tensor; a kept reference cannot), the rest by value."""
    return (a[0] == b[0] and len(a[1]) == len(b[1]) and all(x is y for x, y in zip(a[1], b[1]))
            and a[2] == b[2])


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, scale)


def eot_length(tokens: torch.Tensor) -> int:
    """Positions up to and including the last end-of-text token of a batch of prompts
    (the end-of-text token has the largest id; the padding after it is zeros)."""
    return int(tokens.argmax(dim=-1).max()) + 1


def encode_text_embeddings(clip: nn.Module, prompts: torch.Tensor, tokens: torch.Tensor,
                           run_blocks: Callable | None = None, *, truncate: bool | int = False) -> torch.Tensor:
    """CLIP's text transformer on prompt *embeddings* (learned or adapted), as the official
    prompt-learning trainers run it: + positional embedding, the causal blocks, ln_final,
    the features at each end-of-text token, the text projection.

    ``run_blocks(blocks, x, attn_mask) -> x`` replaces the plain pass through the blocks
    (methods that act inside them, such as adapters).  ``truncate`` (the TRUNCATE_TEXT
    fast path) drops the positions after the longest prompt's end-of-text token: the
    causal mask keeps them from reaching the features that are read.  An int gives that
    length, known beforehand (reading it from tokens on a GPU waits for the GPU)."""
    mask = clip.attn_mask
    positional = clip.positional_embedding
    if truncate:
        length = eot_length(tokens) if truncate is True else int(truncate)
        prompts, positional = prompts[:, :length], positional[:length]
        mask = mask[:length, :length] if mask is not None else None
    x = prompts + positional.to(prompts.dtype)
    mask = mask.to(x.dtype) if mask is not None and mask.is_floating_point() else mask
    if run_blocks is None:
        for block in clip.transformer.resblocks:
            x = block(x, attn_mask=mask)
    else:
        x = run_blocks(clip.transformer.resblocks, x, mask)
    x = clip.ln_final(x).to(prompts.dtype)
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ clip.text_projection


def encode_tokens(clip: nn.Module, tokens: torch.Tensor, *, truncate: bool = False) -> torch.Tensor:
    """``clip.encode_text(tokens)``; with ``truncate``, the same features through the
    truncated path (the token embeddings cast as CLIP's own text path casts them)."""
    if not truncate:
        return clip.encode_text(tokens)
    dtype = clip.transformer.get_cast_dtype()
    return encode_text_embeddings(clip, clip.token_embedding(tokens).to(dtype), tokens, truncate=True)


def copy_checked(state: dict, own: dict, missing: Sequence[str], what: str, options: str) -> None:
    """Copy ``state`` into the tensors ``own`` (name -> tensor) after checking that it fits:
    no ``missing`` keys, no unexpected keys, the same shapes; otherwise one error naming
    them and the ``options`` that must match the run that wrote the file."""
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {list(missing)[:6]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:4]))
        raise MethodError(f"The checkpoint does not fit {what}: {'; '.join(parts)}. Check that {options} "
                          f"match the run that wrote the checkpoint.")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class DatasetContext:
    """What a method classifies, handed to it by the harness: when it is built
    (``build_method``) and whenever the class set changes (``Method.use_dataset``).  A
    method never reads the config's ``DATASET`` node, the dataset catalogue or the toy
    world: a cross-dataset target is classified with the target's own template."""

    classnames: tuple[str, ...]
    name: str = ""  # the catalogue's key ("oxford_pets"); "" for data outside the catalogue
    template: str = DEFAULT_TEMPLATE  # the dataset's zero-shot prompt ("a photo of a {}, a type of pet.")
    world: str = "real"  # "real", "toy" or "synthetic"
    shots: int = 0  # training images per class of the run (0: every image)
    val_is_test: bool = False  # its validation split is its test set (ImageNet): never select on it
    # every class of the dataset the classes above were drawn from (base-to-novel: base and
    # novel), by label; () when not known.  For methods that use class names without images
    # (LASP-V's virtual classes); the others ignore it
    all_classnames: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "all_classnames", tuple(self.all_classnames))


class Method(nn.Module):
    """Base class: a CLIP model plus what a method learns; ``forward(images) -> logits``.

    The trainer owns the loop, optimiser, schedule, precision and evaluation.  A method
    says which parameters train (``trainable``: name prefixes) and may override
    ``loss``, ``set_classnames``, the epoch hooks and ``fit`` (training-free or
    closed-form methods, or methods with an official loop of their own).
    """

    trainable: tuple[str, ...] = ()
    # attribute holding what the official trainer registers and checkpoints
    official_module: str = ""
    # keys of the official state dict that hold class-dependent buffers, dropped on load
    official_ignore: tuple[str, ...] = ()
    registry_name = ""
    node = ""

    def __init__(self, clip: nn.Module, classnames: list[str], cfg: CN, dataset: DatasetContext | None = None):
        super().__init__()
        self.clip = clip
        self.cfg = cfg
        self.classnames = list(classnames)
        self.dataset = dataset if dataset is not None else DatasetContext(tuple(classnames))

    def use_dataset(self, dataset: DatasetContext) -> None:
        """Classify ``dataset`` from now on: its classes, with its template (the harness
        calls this for novel classes and for every cross-dataset or shifted target)."""
        previous, self.dataset = self.dataset, dataset
        try:
            self.set_classnames(list(dataset.classnames))
        except BaseException:  # e.g. ClassesNotSupported: the model stays as it was
            self.dataset = previous
            raise

    # -- configuration -------------------------------------------------------------
    @property
    def options(self) -> CN:
        return self.cfg.TRAINER[self.node]

    @property
    def precision(self) -> str:
        return str(self.options.get("PREC", "fp32"))

    def fast(self, name: str) -> bool:
        """Whether the exact fast path ``SPEED.<name>`` is on (``benchmark.speed``)."""
        return speed.enabled(self.cfg, name)

    def encode_prompts(self, prompts: torch.Tensor, tokens: torch.Tensor, run_blocks: Callable | None = None,
                       *, class_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``encode_text_embeddings`` with this run's text fast path.  ``class_tokens``: the
        per-class tokens that ``tokens`` repeats (CoCoOp), to read the length from."""
        length = 0
        if self.fast("TRUNCATE_TEXT"):
            length = self._prompt_length(tokens if class_tokens is None else class_tokens)
        return encode_text_embeddings(self.clip, prompts, tokens, run_blocks, truncate=length or False)

    def encode_shared(self, prefix: torch.Tensor, suffix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """The text features of the prompts ``cat([prefix[g], suffix[n]])`` (group-major)
        through the SHARED_PREFIX fast path (``methods.text_prefix``): the prefix shared by
        a group's prompts runs once.  None when the fast path is off or cannot serve these
        prompts (a text tower of other blocks, an end-of-text token inside the prefix): the
        caller then encodes the whole prompts."""
        if not self.fast("SHARED_PREFIX") or not supports_shared_prefix(self.clip):
            return None
        longest, first_end = self._prompt_length(tokens, with_first_end=True)
        if first_end < prefix.shape[1]:
            return None
        length = longest if self.fast("TRUNCATE_TEXT") else 0
        return encode_shared_prefix(self.clip, prefix, suffix, tokens, length)

    def _prompt_length(self, tokens: torch.Tensor, *, with_first_end: bool = False):
        # read once per token tensor and version (in-place loads bump it); the tensor itself
        # is kept, so its identity cannot pass to another one while the length is cached
        # (a few token tensors at a time: LASP alternates between two)
        known = self.__dict__.setdefault("_length_of", {})
        cached = known.get(id(tokens))
        if cached is None or cached[0] is not tokens or cached[1] != tokens._version:
            ends = tokens.argmax(dim=-1)
            if len(known) >= 8:
                known.clear()
            cached = known[id(tokens)] = (tokens, tokens._version, int(ends.max()) + 1, int(ends.min()))
        return (cached[2], cached[3]) if with_first_end else cached[2]

    # -- hooks -------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild whatever depends on the class names (novel classes, other datasets)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its class names")

    # Methods whose text features come from ``encode_text()`` (learned prompts, adapters)
    # read them through ``prompt_features``: recomputed at every training step, encoded once
    # at evaluation and kept while nothing they depend on changes.
    def prompt_features(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.encode_text()
        key = self._text_key()
        cached = self.__dict__.get("_text_cache")
        if cached is None or not _same_key(cached[0], key):
            cached = self.__dict__["_text_cache"] = (key, self.encode_text())
        return cached[1]

    def _text_key(self) -> tuple:
        """What the text features depend on: every tensor of the method (learned weights,
        class-name buffers, CLIP's weights, which a method may fold in place) by identity,
        version (optimiser steps and in-place loads bump it), storage, dtype and device; and
        autocast.  No method has to say when they change."""
        tensors = tuple(itertools.chain(self.parameters(), self.buffers()))
        autocast = tuple(torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind)
                         for kind in ("cpu", "cuda"))
        return (autocast, tensors, tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))

    # Methods whose image features are exactly the frozen tower's output (``image_features``
    # below, never trained, never prompted) say so and split ``forward`` into
    # ``image_features`` and ``logits_from_features``: evaluation then shares test features
    # across methods and seeds through the feature cache (benchmark.feature_cache).
    frozen_image_features = False

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output for normalised images (in CLIP's dtype)."""
        return self.clip.encode_image(images.to(self.dtype))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from ``image_features`` (methods with ``frozen_image_features``)."""
        raise NotImplementedError(f"{type(self).__name__} does not classify precomputed features")

    # Methods that do not train by the trainer's loop (training-free, closed-form, or an
    # official loop of their own) define ``fit(self, ctx: trainer.FitContext) -> dict | None``;
    # the dict (chosen hyper-parameters and the split that chose them, ...) goes into the record.
    fit = None

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        """Called by the trainer after each epoch's last step (``epoch`` counts from 0)."""

    def on_train_end(self) -> None:
        """Called by the trainer after the last epoch, before evaluation."""

    # -- parameters ----------------------------------------------------------------
    def freeze(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(any(name.startswith(p) for p in self.trainable))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "Method":
        # the official trainers put only the learned module in train mode; the frozen
        # CLIP stays in eval mode (it has no dropout at the default settings anyway)
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    # -- official checkpoints --------------------------------------------------------
    def load_official_state_dict(self, state_dict: dict) -> None:
        if not self.official_module:
            raise MethodError(f"{type(self).__name__} has no learned weights to load.")
        target: nn.Module = getattr(self, self.official_module)
        state = {k: v for k, v in state_dict.items() if k not in self.official_ignore}
        own = target.state_dict()
        missing = sorted(k for k in own if k not in state and k not in self.official_ignore)
        copy_checked(state, own, missing, f"{type(self).__name__} as configured",
                     "the method, its options (e.g. adapter layers and dimension) and the backbone")
        self.on_weights_loaded()

    def on_weights_loaded(self) -> None:
        """Drop caches that depend on the learned weights."""
