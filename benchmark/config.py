"""Configuration: yacs nodes with the key names of the official trainers' toolbox.

Merge order (later wins; the README's Configuration section):

    defaults  <  method YAML (+ its variant for the protocol/dataset)  <  user YAML  <  KEY VALUE opts

The defaults are the reference toolbox's defaults for every key our trainer reads, so an
official method YAML (e.g. the MMA ``vit_b16_ep5`` file) merges unchanged.  Each method
adds its own ``TRAINER.<NODE>`` defaults when it registers (see ``methods.registry``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, wrong type...)."""


def get_cfg_default() -> CN:
    """The defaults of every key the harness reads, with the reference toolbox's values."""
    cfg = CN()
    cfg.SEED = -1  # < 0 means "do not seed"; protocols always set 1, 2, 3
    cfg.USE_CUDA = True
    cfg.OUTPUT_DIR = ""

    cfg.DATASET = CN()
    cfg.DATASET.ROOT = ""
    cfg.DATASET.NAME = ""
    cfg.DATASET.NUM_SHOTS = -1  # < 1: all training images
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"  # all, base or new (added by every official repo)

    cfg.DATALOADER = CN()
    cfg.DATALOADER.NUM_WORKERS = 4
    cfg.DATALOADER.TRAIN_X = CN()
    cfg.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 32
    cfg.DATALOADER.TEST = CN()
    cfg.DATALOADER.TEST.SAMPLER = "SequentialSampler"
    cfg.DATALOADER.TEST.BATCH_SIZE = 32

    cfg.INPUT = CN()
    cfg.INPUT.SIZE = (224, 224)
    cfg.INPUT.INTERPOLATION = "bilinear"  # every method YAML sets "bicubic"
    cfg.INPUT.TRANSFORMS = ()
    cfg.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]  # every method YAML sets CLIP's values
    cfg.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
    cfg.INPUT.RRCROP_SCALE = (0.08, 1.0)

    cfg.OPTIM = CN()
    cfg.OPTIM.NAME = "adam"  # every method YAML sets "sgd"
    cfg.OPTIM.LR = 0.0003
    cfg.OPTIM.WEIGHT_DECAY = 5e-4
    cfg.OPTIM.MOMENTUM = 0.9
    cfg.OPTIM.SGD_DAMPNING = 0  # sic: the reference key is misspelt
    cfg.OPTIM.SGD_NESTEROV = False
    cfg.OPTIM.ADAM_BETA1 = 0.9
    cfg.OPTIM.ADAM_BETA2 = 0.999
    cfg.OPTIM.LR_SCHEDULER = "single_step"
    cfg.OPTIM.STEPSIZE = (-1,)
    cfg.OPTIM.GAMMA = 0.1
    cfg.OPTIM.MAX_EPOCH = 10
    cfg.OPTIM.WARMUP_EPOCH = -1
    cfg.OPTIM.WARMUP_TYPE = "linear"  # constant or linear
    cfg.OPTIM.WARMUP_CONS_LR = 1e-5
    cfg.OPTIM.WARMUP_MIN_LR = 1e-5
    cfg.OPTIM.WARMUP_RECOUNT = True

    cfg.TRAIN = CN()
    cfg.TRAIN.PRINT_FREQ = 10

    cfg.TEST = CN()
    cfg.TEST.EVALUATOR = "Classification"
    cfg.TEST.FINAL_MODEL = "last_step"  # the only mode any official protocol uses
    cfg.TEST.SPLIT = "test"
    cfg.TEST.NO_TEST = False

    cfg.MODEL = CN()
    cfg.MODEL.BACKBONE = CN()
    cfg.MODEL.BACKBONE.NAME = "ViT-B/16"
    cfg.MODEL.INIT_WEIGHTS = ""

    cfg.TRAINER = CN()
    cfg.TRAINER.NAME = ""

    # Exact fast paths (benchmark.speed): none of them changes a number, so none is part
    # of a run's identity; each can be switched off to prove it (SPEED.<NAME> False).
    cfg.SPEED = CN()
    cfg.SPEED.ENABLED = True  # False: every fast path off (the plain, official computation)
    cfg.SPEED.TRUNCATE_TEXT = True  # prompts cut to the longest real token sequence
    cfg.SPEED.SHARED_PREFIX = True  # prompt positions shared by every class (CoOp's context) run once
    cfg.SPEED.FROZEN_TEXT = True  # frozen text layers below the first trained one run once per class set
    cfg.SPEED.FEATURE_CACHE = True  # test features of a frozen image encoder, on disk, shared by runs
    cfg.SPEED.IMAGE_CACHE = True  # test images decoded and cropped once into a uint8 memory map
    cfg.SPEED.MEMORY_IMAGES = True  # a loader's images decoded once per process and kept, when they fit:
    cfg.SPEED.MEMORY_IMAGES_MB = 512  # at most this many megabytes of decoded images per process
    cfg.SPEED.BATCH_TENSORS = True  # ToTensor and Normalize applied to a whole batch at once
    cfg.SPEED.EVAL_BATCH_SIZE = 0  # > 0: evaluation batch size (0: DATALOADER.TEST.BATCH_SIZE)
    cfg.SPEED.CACHE_DIR = ""  # where the disk caches live ("" : <output>/cache from the command line)
    return cfg


def _to_node(value: Any) -> Any:
    if isinstance(value, dict):
        return CN({k: _to_node(v) for k, v in value.items()})
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML file with "
                          f"official-style keys (e.g. OPTIM: {{LR: 0.002}}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path} is not a text file ({exc.reason} at byte {exc.start}). Pass a YAML "
                          f"file of official-style keys (e.g. OPTIM: {{LR: 0.002}}).") from exc
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read: {exc.strerror or exc}.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def merge_dict(cfg: CN, data: dict, source: str) -> None:
    """Merge a nested dict into cfg with yacs' type checks, naming the source on failure."""
    try:
        cfg.merge_from_other_cfg(_to_node(copy.deepcopy(data)))
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from exc


def merge_opts(cfg: CN, opts: Iterable[str], source: str = "command-line opts") -> None:
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"{source}: expected KEY VALUE pairs, got an odd number of items: {opts}. "
                          f"Example: --opts OPTIM.MAX_EPOCH 2 TRAINER.MMADAPTER.ADAPTER_SCALE 0.01")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from exc


def _explain(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    if isinstance(exc, KeyError) or "Non-existent" in text:
        return (f"{text}. The key does not exist; keys use the reference toolbox's names, "
                f"e.g. OPTIM.LR, DATALOADER.TRAIN_X.BATCH_SIZE, TRAINER.<METHOD>.<KEY> "
                f"(`python run.py list` shows the methods).")
    return f"{text}. Give a value of the key's type (see the defaults in benchmark/config.py)."


def to_dict(cfg: CN) -> dict:
    """A plain, JSON-serialisable copy of a config node (tuples become lists)."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, CN):
            out[key] = to_dict(value)
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out
