"""Tests for benchmark.backbone: tiny configs, OpenAI-format round trips, offline lookups, errors.

Everything runs on CPU with the tiny configs in benchmark/model_configs; checkpoints are
real files written into tmp_path, nothing is mocked except the network, which is made to
fail loudly so that a lookup that tries to download is caught.
"""

from __future__ import annotations

import json
import os
import socket

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from tolerance import assert_close, clip_ops

from benchmark.backbone import (
    DEFAULT_BACKBONE,
    BackboneError,
    backbone_fingerprint,
    clip_info,
    load_clip,
    resolve_device,
    save_openai_checkpoint,
    tokenize,
)

SENTENCES = ["a photo of a cat.", "a photo of a dog, a type of pet.", "X" * 300]


@pytest.fixture(scope="module")
def tiny12():
    return load_clip("tiny-clip-12", seed=3)


@pytest.fixture
def no_network(monkeypatch):
    """Records (and refuses) every attempt to open a network connection."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Points every cache the loader may read at empty folders."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CLIP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _features(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenize(SENTENCES))


# ----------------------------------------------------------------------------- tiny configs

def test_tiny_clip_12_shapes(tiny12):
    m = tiny12
    assert type(m) is open_clip.model.CLIP
    assert isinstance(m.visual, VisionTransformer)
    assert len(m.visual.transformer.resblocks) == 12
    assert len(m.transformer.resblocks) == 12
    assert not m.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.attn_mask.shape == (77, 77)
    for tower in (m.visual.transformer, m.transformer):
        attn = tower.resblocks[0].attn
        assert attn.embed_dim // attn.num_heads >= 16
        assert isinstance(tower.resblocks[0].mlp.gelu, QuickGELU)
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj"):
        assert hasattr(m.visual, name)
    for name in ("token_embedding", "positional_embedding", "ln_final", "text_projection", "logit_scale"):
        assert hasattr(m, name)
    assert clip_info(m) == {
        "image_size": 32, "embed_dim": 32, "vision_width": 128, "text_width": 64,
        "vision_layers": 12, "text_layers": 12, "context_length": 77, "vision_type": "vit",
    }
    image, text = _features(m)
    assert image.shape == (4, 32) and text.shape == (3, 32)


def test_tiny_clip_1_has_one_layer_per_tower():
    m = load_clip("tiny-clip-1")
    info = clip_info(m)
    assert (info["vision_layers"], info["text_layers"]) == (1, 1)
    assert open_clip.get_model_config("tiny-clip-1") is not None  # registered with open_clip too


def test_tiny_is_deterministic_per_seed(tiny12):
    again = load_clip("tiny-clip-12", seed=3)
    other = load_clip("tiny-clip-12", seed=4)
    sd, sd_again, sd_other = tiny12.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)  # the same draws from the same seed
    assert not torch.equal(sd["visual.conv1.weight"], sd_other["visual.conv1.weight"])
    assert not torch.equal(sd["token_embedding.weight"], sd_other["token_embedding.weight"])


def test_loading_leaves_global_rng_alone(tmp_path, tiny12):
    path = tmp_path / "m.pt"
    save_openai_checkpoint(tiny12, path)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    load_clip("tiny-clip-1", seed=7)
    load_clip(str(path))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


# ----------------------------------------------------------------------------- OpenAI format

@pytest.mark.parametrize("torchscript", [False, True], ids=["state_dict", "torchscript"])
def test_openai_checkpoint_round_trip(tmp_path, tiny12, torchscript):
    path = tmp_path / "ViT-tiny.pt"
    save_openai_checkpoint(tiny12, path, torchscript=torchscript)
    loaded = load_clip(str(path))

    assert type(loaded) is open_clip.model.CLIP
    assert isinstance(loaded.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert clip_info(loaded) == clip_info(tiny12)
    sd, sd_loaded = tiny12.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys()
    assert all(torch.equal(sd[k], sd_loaded[k]) for k in sd)
    for ours, theirs in zip(_features(tiny12), _features(loaded)):
        assert_close(ours, theirs, ops=clip_ops(tiny12))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_file_has_openai_keys(tmp_path, tiny12):
    path = tmp_path / "scripted.pt"
    save_openai_checkpoint(tiny12, path, torchscript=True)
    archive = torch.jit.load(str(path), map_location="cpu")
    keys = set(archive.state_dict())
    model_keys = set(tiny12.state_dict())
    # OpenAI's archives carry these three next to the weights; the causal mask is never stored
    assert keys == model_keys | {"input_resolution", "context_length", "vocab_size"}
    assert "attn_mask" not in keys
    assert int(archive.state_dict()["input_resolution"]) == 32
    assert {"visual.proj", "visual.transformer.resblocks.11.attn.in_proj_weight",
            "transformer.resblocks.11.mlp.c_proj.bias", "text_projection"} <= keys


def test_plain_file_wrapped_in_state_dict_and_module_prefix(tmp_path, tiny12):
    sd = {f"module.{k}": v for k, v in tiny12.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded = load_clip(str(path))
    assert torch.equal(loaded.visual.proj, tiny12.visual.proj)


def test_cannot_save_model_with_plain_gelu(tmp_path):
    cfg = json.loads(json.dumps(open_clip.get_model_config("tiny-clip-1")))
    cfg["quick_gelu"] = False
    model = open_clip.model.CLIP(**cfg)
    with pytest.raises(BackboneError, match="QuickGELU"):
        save_openai_checkpoint(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- bad files and names

def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(BackboneError, match="not a readable PyTorch checkpoint"):
        load_clip(str(path))


def test_json_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"embed_dim": 512}))
    with pytest.raises(BackboneError, match="not a readable PyTorch checkpoint"):
        load_clip(str(path))


def test_missing_key_is_reported(tmp_path, tiny12):
    sd = tiny12.state_dict()
    del sd["visual.ln_post.weight"]
    path = tmp_path / "missing.pt"
    torch.save(sd, path)
    with pytest.raises(BackboneError, match=r"missing 1 key\(s\) such as visual.ln_post.weight"):
        load_clip(str(path))


def test_unexpected_key_is_reported(tmp_path, tiny12):
    sd = dict(tiny12.state_dict(), **{"visual.head.weight": torch.zeros(3)})
    path = tmp_path / "extra.pt"
    torch.save(sd, path)
    with pytest.raises(BackboneError, match="unexpected key.*visual.head.weight"):
        load_clip(str(path))


def test_foreign_key_set_is_reported(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(BackboneError, match="does not look like an OpenAI CLIP checkpoint: missing"):
        load_clip(str(path))


def test_wrong_shape_is_reported(tmp_path, tiny12):
    sd = tiny12.state_dict()
    sd["visual.ln_post.weight"] = torch.zeros(5)
    path = tmp_path / "shape.pt"
    torch.save(sd, path)
    with pytest.raises(BackboneError, match="do not fit"):
        load_clip(str(path))


def test_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_clip(str(tmp_path / "nope.pt"))
    with pytest.raises(BackboneError) as err:
        load_clip("tiny-clip-13")
    message = str(err.value)
    assert "Did you mean" in message and "tiny-clip-12" in message
    assert "ViT-B/16" in message and "ViT-B-16:openai" in message and "checkpoint file" in message
    with pytest.raises(BackboneError, match="pretrained tag"):
        load_clip("ViT-B-16")
    with pytest.raises(BackboneError, match="known tags"):
        load_clip("ViT-B-16:no_such_tag")


# ----------------------------------------------------------------------------- offline lookups

def test_openai_name_found_in_cache_dir(tmp_path, tiny12, empty_caches, monkeypatch, no_network):
    cache = tmp_path / "clip-cache"
    save_openai_checkpoint(tiny12, cache / "ViT-B-16.pt", torchscript=True)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(cache))
    loaded = load_clip(DEFAULT_BACKBONE)
    assert torch.equal(loaded.visual.proj, tiny12.visual.proj)
    assert backbone_fingerprint(DEFAULT_BACKBONE) == backbone_fingerprint(str(cache / "ViT-B-16.pt"))
    monkeypatch.delenv("CLIP_CACHE_DIR")
    assert torch.equal(load_clip("ViT-B/16", cache_dir=cache).visual.proj, tiny12.visual.proj)
    assert no_network == []


def test_openai_name_absent_is_a_clear_error(empty_caches, no_network):
    with pytest.raises(BackboneError) as err:
        load_clip("ViT-B/16")
    message = str(err.value)
    assert "ViT-B-16.pt" in message and "--clip" in message and "ViT-B-16:openai" in message
    assert no_network == []


def test_open_clip_tag_absent_never_touches_network(empty_caches, no_network):
    with pytest.raises(BackboneError, match="not in your local cache"):
        load_clip("ViT-B-16:laion2b_s34b_b88k")
    assert no_network == []


def test_open_clip_tag_from_local_hub_cache(tmp_path, tiny12, empty_caches, monkeypatch, no_network):
    # a pretrained tag for the tiny architecture, cached the way huggingface_hub lays files out
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, "tiny-clip-12",
        {"test": dict(url="", hf_hub="test-org/tiny-clip-12/", quick_gelu=True)},
    )
    repo = empty_caches / "hf" / "models--test-org--tiny-clip-12"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.save(tiny12.state_dict(), repo / "snapshots" / commit / "open_clip_pytorch_model.bin")

    offline_before = os.environ.get("HF_HUB_OFFLINE")
    loaded = load_clip("tiny-clip-12:test")
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # the offline switch is scoped to the load
    assert type(loaded) is open_clip.model.CLIP
    for ours, theirs in zip(_features(tiny12), _features(loaded)):
        assert_close(ours, theirs, ops=clip_ops(tiny12))
    assert backbone_fingerprint("tiny-clip-12:test") == "tiny-clip-12:test"
    assert no_network == []


# ----------------------------------------------------------------------------- tokenizer

def test_tokenize_matches_clip_vocabulary():
    encoder = open_clip.tokenizer.SimpleTokenizer().encoder
    expected = [encoder["<start_of_text>"]] + [
        encoder[w] for w in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ".</w>")
    ] + [encoder["<end_of_text>"]]
    assert expected == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    tokens = tokenize(["a photo of a cat.", "A  photo of a CAT."])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, :8].tolist() == expected
    assert tokens[0, 8:].eq(0).all()
    assert torch.equal(tokens[0], tokens[1])  # lower-cased, whitespace collapsed, like OpenAI's


def test_tokenize_truncates_with_eot_last():
    tokens = tokenize(["word " * 200], context_length=16)
    assert tokens.shape == (1, 16)
    assert tokens[0, 0] == 49406 and tokens[0, -1] == 49407


# ----------------------------------------------------------------------------- identity and devices

def test_fingerprint_tiny_is_stable_and_seeded():
    fp = backbone_fingerprint("tiny-clip-12", seed=0)
    assert fp == backbone_fingerprint("tiny-clip-12", seed=0)
    assert fp.startswith("tiny-clip-12:seed=0:")
    assert fp != backbone_fingerprint("tiny-clip-12", seed=1)
    assert fp.split(":cfg=")[1] != backbone_fingerprint("tiny-clip-1").split(":cfg=")[1]


def test_fingerprint_follows_file_content(tmp_path, tiny12):
    path = tmp_path / "m.pt"
    save_openai_checkpoint(tiny12, path)
    first = backbone_fingerprint(str(path))
    assert first.startswith("sha256:") and first == backbone_fingerprint(str(path))
    save_openai_checkpoint(load_clip("tiny-clip-12", seed=9), path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # coarse mtime clocks
    assert backbone_fingerprint(str(path)) != first


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(BackboneError, match="Unknown device"):
        resolve_device("gpu0")
