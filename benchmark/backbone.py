"""CLIP backbones: one loader for OpenAI checkpoints, open_clip names and tiny test models.

Every method in the benchmark adapts the same frozen CLIP, so every backbone is returned
as a standard open_clip ``CLIP`` in fp32 and eval mode, whose towers can be run block by
block (``model.visual.transformer.resblocks``, ``model.transformer.resblocks``, ...).

A backbone spec is one of
  * a path to an OpenAI-format checkpoint: the TorchScript archive OpenAI distributes
    (``ViT-B-16.pt``) or a plain state dict with OpenAI's key names;
  * an OpenAI model name (``ViT-B/16``, ``RN50``), looked up in the local download caches;
  * an open_clip name with a pretrained tag (``ViT-B-16:openai``), from the local cache only;
  * a tiny test architecture, a JSON file in ``model_configs/`` whose name is its key
    (open_clip's config format), built with random weights fixed by a seed.

Nothing here ever reaches the network: a missing file is a :class:`BackboneError` that says
where we looked and what to pass instead.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer
from torch import nn

from benchmark.openai_files import (
    BackboneError,
    build_from_state_dict,
    is_torchscript,
    read_state_dict,
    save_openai_checkpoint,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "backbone_fingerprint",
    "clip_info",
    "list_backbones",
    "load_clip",
    "resolve_device",
    "save_openai_checkpoint",
    "tokenize",
]

_logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "ViT-B/16"  # the backbone of the CoOp / MaPLe / MMA papers, OpenAI naming
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # weights shipped with the project

# OpenAI model name -> (file name of OpenAI's release, open_clip name of the same weights)
_OPENAI_MODELS: dict[str, tuple[str, str]] = {
    "RN50": ("RN50.pt", "RN50"),
    "RN101": ("RN101.pt", "RN101"),
    "RN50x4": ("RN50x4.pt", "RN50x4"),
    "RN50x16": ("RN50x16.pt", "RN50x16"),
    "RN50x64": ("RN50x64.pt", "RN50x64"),
    "ViT-B/32": ("ViT-B-32.pt", "ViT-B-32"),
    "ViT-B/16": ("ViT-B-16.pt", "ViT-B-16"),
    "ViT-L/14": ("ViT-L-14.pt", "ViT-L-14"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt", "ViT-L-14-336"),
}

@dataclass(frozen=True)
class _Source:
    kind: str  # "tiny", "file" or "open_clip"
    name: str  # config name, checkpoint path or open_clip model name
    tag: str = ""  # open_clip pretrained tag
    spec: str = ""  # what the user wrote, for messages


# ----------------------------------------------------------------------------- configs

_registered = False


def _register_configs() -> None:
    """Adds ``model_configs/`` to open_clip's registry once, so ``open_clip.list_models()`` shows it."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def _tiny_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def list_backbones() -> dict[str, list[str]]:
    """What :func:`load_clip` accepts by name: tiny configs, OpenAI names and open_clip names with an 'openai' tag."""
    return {
        "tiny": _tiny_config_names(),
        "openai": list(_OPENAI_MODELS),
        "open_clip": [f"{name}:openai" for _, name in _OPENAI_MODELS.values()],
    }


_register_configs()


# ----------------------------------------------------------------------------- devices

def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turns ``"auto"``/None into cuda when present (else cpu); refuses a device this machine lacks."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BackboneError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(
                f"Device {device!r} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "use --device cpu, or --device auto to pick cuda only when present."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackboneError(
                f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BackboneError(f"Device {device!r} was requested but MPS is not available; use --device cpu.")
    return dev


# ----------------------------------------------------------------------------- resolving specs

def _cache_dirs(cache_dir: str | os.PathLike | None) -> list[Path]:
    """Where OpenAI's files are usually downloaded to, most specific first."""
    dirs: list[Path] = []
    if cache_dir:
        dirs.append(Path(cache_dir).expanduser())
    if os.environ.get("CLIP_CACHE_DIR"):
        dirs.append(Path(os.environ["CLIP_CACHE_DIR"]).expanduser())
    if os.environ.get("XDG_CACHE_HOME"):
        dirs.append(Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "clip")
    # the directory both the original clip package and open_clip's URL downloads use
    dirs.append(Path("~/.cache/clip").expanduser())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _find_open_clip_weights(name: str, tag: str, cache_dir: str | os.PathLike | None) -> tuple[str | None, list[str]]:
    """Finds a pretrained tag's file in the local caches without any network access.

    Returns the path (or None) and the places looked at, for the error message.
    """
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    looked: list[str] = []
    if cfg.get("file"):
        looked.append(str(cfg["file"]))
        if os.path.isfile(cfg["file"]):
            return str(cfg["file"]), looked
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
            try_to_load_from_cache = None
        # open_clip's convention: "org/repo/" means the default file name, "org/repo/file" a given one
        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        # open_clip prefers a safetensors twin of a pickle file when the hub has one
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        hub_dirs = [str(Path(cache_dir).expanduser())] if cache_dir else []
        hub_dirs.append(None)  # huggingface_hub's default cache (HF_HOME / HF_HUB_CACHE)
        for hub_dir in hub_dirs:
            looked.append(f"hf cache {hub_dir or 'default'}: {repo_id}")
            if try_to_load_from_cache is None:
                continue
            for fn in candidates:
                found = try_to_load_from_cache(repo_id, fn, cache_dir=hub_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found, looked
    url = cfg.get("url", "")
    if url:
        for d in _cache_dirs(cache_dir):
            target = d / os.path.basename(url)
            looked.append(str(target))
            if target.is_file():
                return str(target), looked
    return None, looked


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "~", os.sep))
        or spec.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar"))
        or (os.sep in spec and spec not in _OPENAI_MODELS)
    )


def _accepted_message() -> str:
    return (
        "Accepted backbones: a path to an OpenAI CLIP checkpoint file (e.g. /path/to/ViT-B-16.pt); "
        f"an OpenAI name found in the local cache ({', '.join(_OPENAI_MODELS)}); "
        "an open_clip name with a pretrained tag in the local cache (e.g. ViT-B-16:openai, "
        "ViT-B-16:laion2b_s34b_b88k); or a tiny test model "
        f"({', '.join(_tiny_config_names())})."
    )


def _resolve(spec: str, cache_dir: str | os.PathLike | None = None) -> _Source:
    """Decides what a spec names, without building anything."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise BackboneError(f"Empty backbone spec {spec!r}. {_accepted_message()}")
    spec = str(spec).strip()
    shipped = WEIGHTS_DIR / f"{spec}.pt"
    if "/" not in spec and shipped.is_file():
        # weights shipped with the project (the toy world's CLIP) win over a config of that name
        return _Source("file", str(shipped), spec=spec)
    if spec in _tiny_config_names():
        return _Source("tiny", spec, spec=spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _Source("file", str(path.resolve()), spec=spec)
    if path.is_dir():
        raise BackboneError(f"{spec} is a directory; pass the checkpoint file inside it (e.g. {spec}/ViT-B-16.pt).")

    if spec in _OPENAI_MODELS:
        filename, oc_name = _OPENAI_MODELS[spec]
        dirs = _cache_dirs(cache_dir)
        for d in dirs:
            if (d / filename).is_file():
                return _Source("file", str((d / filename).resolve()), spec=spec)
        # the same weights as open_clip caches them from the hub also serve
        found, looked = _find_open_clip_weights(oc_name, "openai", cache_dir)
        if found:
            return _Source("open_clip", oc_name, "openai", spec=spec)
        raise BackboneError(
            f"{spec} was not found: no {filename} in {', '.join(str(d) for d in dirs)} and no "
            f"{oc_name}:openai weights in the local model-hub cache. This machine cannot download, so pass "
            f"--clip /path/to/{filename} (the OpenAI file), set CLIP_CACHE_DIR to the folder that holds it, "
            f"or use an open_clip name with a pretrained tag such as {oc_name}:openai that is in your local cache."
        )

    if _looks_like_path(spec):
        raise BackboneError(f"Checkpoint file {spec} does not exist. {_accepted_message()}")

    if ":" in spec:
        name, tag = spec.rsplit(":", 1)
        name = name.replace("/", "-")
        tag = tag.lower().replace("-", "_")  # open_clip's own tag normalisation
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise BackboneError(f"Unknown open_clip architecture {name!r} in {spec!r}.{hint} {_accepted_message()}")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise BackboneError(
                f"open_clip has no pretrained tag {tag!r} for {name}; known tags: {', '.join(tags) or 'none'}."
            )
        return _Source("open_clip", name, tag, spec=spec)

    oc_names = open_clip.list_models()
    if spec in oc_names or spec.replace("/", "-") in oc_names:
        name = spec.replace("/", "-")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(
            f"{spec!r} names an open_clip architecture but not its weights; add a pretrained tag, "
            f"e.g. {name}:{tags[0] if tags else 'openai'} (known tags: {', '.join(tags) or 'none'})."
        )
    pool = _tiny_config_names() + list(_OPENAI_MODELS)
    close = difflib.get_close_matches(spec, pool, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(f"Unknown backbone {spec!r}.{hint} {_accepted_message()}")


# ----------------------------------------------------------------------------- loading

def _build_tiny(name: str, seed: int) -> CLIP:
    cfg = open_clip.get_model_config(name)  # a deep copy of the registered JSON
    if cfg is None:
        _register_configs()
        cfg = open_clip.get_model_config(name)
    cfg = copy.deepcopy(cfg)
    cfg.pop("custom_text", None)
    # seed a private RNG stream: the caller's torch RNG must not move, so that building a
    # backbone never changes what a later seeded step (few-shot sampling, init) draws
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**cfg, cast_dtype=None)
    return model.float().eval()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Makes huggingface_hub refuse network access for the duration of a load."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    hub_constants = None
    saved_flag = None
    try:
        import huggingface_hub.constants as hub_constants  # read at import, so patch the module too

        saved_flag = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_flag


def _build_open_clip(name: str, tag: str, cache_dir: str | os.PathLike | None, spec: str) -> CLIP:
    arch = open_clip.get_model_config(name) or {}
    if (
        arch.get("custom_text")
        or "hf_model_name" in arch.get("text_cfg", {})
        or "timm_model_name" in arch.get("vision_cfg", {})
        or "multimodal_cfg" in arch
    ):
        raise BackboneError(
            f"{spec}: open_clip builds {name} with a non-standard tower (a hub text tower, a timm vision tower or CoCa); "
            "the methods here need open_clip's built-in CLIP towers (ViT or ModifiedResNet image tower and "
            "the OpenAI-style text transformer), e.g. ViT-B-16:openai."
        )
    path, looked = _find_open_clip_weights(name, tag, cache_dir)
    if path is None:
        raise BackboneError(
            f"{name}:{tag} is not in your local cache (looked in: {'; '.join(looked) or 'nowhere'}). "
            "This machine cannot download weights: fetch them once elsewhere with "
            f"open_clip.create_model('{name}', pretrained='{tag}') and copy the cache, or pass an OpenAI "
            "checkpoint file (e.g. --clip /path/to/ViT-B-16.pt)."
        )
    if is_torchscript(Path(path)):  # OpenAI's archive cached under its URL name
        return build_from_state_dict(read_state_dict(path), path)
    pcfg = open_clip.get_pretrained_cfg(name, tag) or {}
    # passing the file (not the tag) keeps open_clip away from any download code; the tag's
    # activation and preprocessing settings are then applied by hand
    preprocess = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
    try:
        with _offline(), torch.random.fork_rng(devices=[]):
            model = open_clip.create_model(
                name, pretrained=path, precision="fp32", device="cpu",
                force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
                force_preprocess_cfg=preprocess or None,
                cache_dir=str(cache_dir) if cache_dir else None,
            )
    except Exception as e:
        raise BackboneError(
            f"open_clip could not load {name}:{tag} from {path} ({type(e).__name__}: {str(e).splitlines()[0][:300]})."
        ) from e
    if type(model) is not CLIP:
        raise BackboneError(f"{spec}: open_clip returned a {type(model).__name__}; the methods need a standard CLIP.")
    return model.float().eval()


def load_clip(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> CLIP:
    """Returns an fp32 open_clip ``CLIP`` in eval mode on ``device``.

    spec: a checkpoint path, an OpenAI name (``ViT-B/16``), an open_clip ``name:tag`` or a
    tiny config name; see the module docstring. seed only matters for tiny configs, whose
    weights are random but fixed by it. cache_dir is searched before the usual caches.
    """
    dev = resolve_device(device)
    source = _resolve(spec, cache_dir)
    if source.kind == "tiny":
        model = _build_tiny(source.name, seed)
    elif source.kind == "file":
        model = build_from_state_dict(read_state_dict(source.name), source.name)
    else:
        model = _build_open_clip(source.name, source.tag, cache_dir, source.spec)
    _logger.info("loaded backbone %s (%s)", source.spec, source.kind)
    return model.to(dev)


_LOADED: dict[str, CLIP] = {}


def clip_copy(spec: str) -> CLIP:
    """A private fp32 CPU copy of ``load_clip(spec)``; the file is read once per process
    (one backbone kept at a time), so that a sweep checks it before its first run and its
    runs in this process do not read it again."""
    if spec not in _LOADED:
        _LOADED.clear()
        _LOADED[spec] = load_clip(spec, "cpu")
    return copy.deepcopy(_LOADED[spec])


# ----------------------------------------------------------------------------- introspection

def clip_info(model: CLIP) -> dict[str, Any]:
    """Sizes the methods need: image_size, embed_dim, vision/text width and layers, context_length."""
    visual = model.visual
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else tuple(size)
    if isinstance(visual, VisionTransformer):
        vision_width = visual.transformer.width
        vision_layers = visual.transformer.layers
        vision_type = "vit"
    else:  # ModifiedResNet: width of its first stage, one entry per stage
        vision_width = visual.layer1[0].conv1.out_channels
        vision_layers = sum(len(getattr(visual, f"layer{b}")) for b in (1, 2, 3, 4))
        vision_type = "resnet"
    proj = model.text_projection
    embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
    return {
        "image_size": int(size) if not isinstance(size, tuple) else size,
        "embed_dim": int(embed_dim),
        "vision_width": int(vision_width),
        "text_width": int(model.transformer.width),
        "vision_layers": int(vision_layers),
        "text_layers": int(model.transformer.layers),
        "context_length": int(model.context_length),
        "vision_type": vision_type,
    }


def tokenize(texts: list[str], context_length: int = 77) -> torch.LongTensor:
    """CLIP's BPE: ``[SOT, ..., EOT, 0, ...]`` per text, truncated to context_length with EOT kept last."""
    if isinstance(texts, str):
        texts = [texts]
    return open_clip.tokenize(list(texts), context_length=context_length).long()


# ----------------------------------------------------------------------------- identity

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def backbone_fingerprint(spec: str, seed: int = 0, *, cache_dir: str | os.PathLike | None = None) -> str:
    """A short stable string naming the weights ``load_clip(spec, seed=seed)`` would load.

    Tiny configs: ``name:seed=S:cfg=<hash of the JSON>``; files (and OpenAI names found as
    files): ``sha256:<first 16 hex of the content>``; open_clip names: ``name:tag``.
    """
    source = _resolve(spec, cache_dir)
    if source.kind == "tiny":
        cfg = json.loads((CONFIG_DIR / f"{source.name}.json").read_text())
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        return f"{source.name}:seed={seed}:cfg={digest}"
    if source.kind == "file":
        return f"sha256:{_file_sha256(source.name)[:16]}"
    return f"{source.name}:{source.tag}"
