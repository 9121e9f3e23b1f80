"""CLIP-Adapter: the residual bottleneck on the image feature, what trains, class names
and the official checkpoint layout."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale

import benchmark
import methods.clip_adapter  # noqa: F401  (registers the method)
from benchmark.backbone import tokenize
from methods.clip_adapter import Adapter

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon", "sea lion"]
PETS = "a photo of a {}, a type of pet."


def _adapter(clip, names=NAMES, dataset="oxford_pets", seed=0, **kw):
    torch.manual_seed(seed)
    return benchmark.build("clip_adapter", names, clip=clip, dataset=dataset, **kw)


def _reference_logits(clip, w1, w2, images, template, names, ratio=0.2):
    """ratio * relu(W2 relu(W1 f)) + (1 - ratio) * f, then cosine logits with the template's classifier."""
    f = clip.encode_image(images)
    a = F.relu(F.relu(f @ w1.t()) @ w2.t())
    g = ratio * a + (1 - ratio) * f
    t = clip.encode_text(tokenize([template.format(n.replace("_", " ")) for n in names]))
    return clip.logit_scale.exp() * F.normalize(g, dim=-1) @ F.normalize(t, dim=-1).t()


def test_bottleneck_shape_follows_the_backbone(tiny_clip):
    model = _adapter(tiny_clip)
    d = tiny_clip.visual.output_dim
    fc = model.adapter.fc
    assert fc[0].weight.shape == (d // 4, d) and fc[2].weight.shape == (d, d // 4)
    assert fc[0].bias is None and fc[2].bias is None
    assert isinstance(fc[1], torch.nn.ReLU) and isinstance(fc[3], torch.nn.ReLU)
    assert (model.ratio, model.options.PREC, model.cfg.OPTIM.MAX_EPOCH) == (0.2, "fp32", 200)
    # the official RN50 layer (1024 -> 256 -> 1024) and the ViT-B/16 one (512 -> 128 -> 512)
    assert sum(p.numel() for p in Adapter(1024).parameters()) == 2 * 1024 * 256
    assert sum(p.numel() for p in Adapter(512).parameters()) == 2 * 512 * 128


def test_forward_equals_the_residual_mix(tiny_clip):
    model = _adapter(tiny_clip)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fc = model.adapter.fc
    with torch.no_grad():
        expected = _reference_logits(tiny_clip, fc[0].weight, fc[2].weight, images, PETS, NAMES)
        got = model(images)
        zero_shot = _reference_logits(tiny_clip, fc[0].weight, fc[2].weight, images, PETS, NAMES, ratio=0.0)
    assert_close(got, expected, ops=clip_ops(tiny_clip))
    assert not torch.allclose(got, zero_shot, atol=1e-3)  # the adapter changes the logits
    # ratio 0: zero-shot CLIP with the dataset's template
    plain = _adapter(copy.deepcopy(tiny_clip), RATIO=0.0)
    with torch.no_grad():
        assert_close(plain(images), zero_shot, ops=clip_ops(tiny_clip))


def test_only_the_adapter_trains(tiny_clip):
    model = _adapter(tiny_clip)
    model.train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"adapter.fc.0.weight", "adapter.fc.2.weight"}
    assert all(not p.requires_grad for p in model.clip.parameters())
    logits = model(torch.randn(8, 3, 32, 32))
    model.loss(logits, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"adapter.fc.0.weight", "adapter.fc.2.weight"}
    assert not model.text_features.requires_grad


def test_novel_classes_reuse_the_class_agnostic_adapter(tiny_clip):
    model = _adapter(tiny_clip)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(images)
        model.set_classnames(["sea_lion", "golden_retriever"])
        two = model(images)
    assert two.shape == (3, 2)
    assert_close(two, full[:, [3, 0]], ops=clip_ops(tiny_clip))  # a text batch of another size


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = _adapter(tiny_clip, seed=1)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "clip_adapter" / "model.pth.tar-200", 200)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == {"fc.0.weight", "fc.2.weight"}
    fresh = _adapter(copy.deepcopy(tiny_clip), names=["x", "y"], seed=2)
    assert not torch.equal(fresh.adapter.fc[0].weight, trained.adapter.fc[0].weight)
    assert benchmark.load_official_checkpoint(fresh, path)["epoch"] == 200
    fresh.set_classnames(NAMES)
    # the adapter bit for bit; the logits up to rounding (fresh encodes the class names again)
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
