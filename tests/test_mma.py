"""MMA: adapter placement, equations, gradient-scaling rule, frozen backbone, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale

import benchmark
from benchmark.backbone import tokenize
from methods.mma import _build_adapters

NAMES = ["golden_retriever", "tabby cat", "red fox", "hot-air balloon", "sea lion"]


def _mma(clip, names=NAMES, **kw):
    torch.manual_seed(0)
    return benchmark.build("mma", names, clip=clip, **kw)


def _perturb(model, seed=1):
    """Give the adapters non-trivial values (fresh ones have zero biases only)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_learner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_adapters_on_layers_5_to_12_of_both_towers(tiny_clip):
    model = _mma(tiny_clip)
    learner = model.adapter_learner
    n = len(tiny_clip.transformer.resblocks)
    assert n == 12 and len(tiny_clip.visual.transformer.resblocks) == 12
    for tower in (learner.text_adapter, learner.visual_adapter, learner.shared_adapter):
        assert len(tower) == 13  # index 0 = before the transformer, 1..12 = blocks
        assert [i for i, a in enumerate(tower) if a is not None] == list(range(5, 13))
    d_text, d_vis = tiny_clip.ln_final.weight.shape[0], tiny_clip.visual.ln_post.weight.shape[0]
    for i in range(5, 13):
        assert learner.text_adapter[i].down[0].weight.shape == (32, d_text)
        assert learner.text_adapter[i].up.weight.shape == (d_text, 32)
        assert learner.visual_adapter[i].down[0].weight.shape == (32, d_vis)
        assert learner.visual_adapter[i].up.weight.shape == (d_vis, 32)
        # the shared projection between the two branches: DIM -> DIM, one per layer
        assert learner.shared_adapter[i][0].weight.shape == (32, 32)
    # only the adapters train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter_learner.") for n in trainable)
    assert all(not p.requires_grad for p in model.clip.parameters())


def test_official_parameter_names_and_vit_b16_count():
    # ViT-B/16: text width 512, image width 768, 12 blocks each, DIM 32, layers 5..12
    text = _build_adapters(512, 12, 5, 12, 32)
    visual = _build_adapters(768, 12, 5, 12, 32)
    shared = _build_adapters(32, 12, 5, 12, 32)
    total = sum(p.numel() for m in (text, visual, shared) for p in m.parameters())
    # 8 layers x [(512*32+32) + (32*512+512) + (768*32+32) + (32*768+768) + (32*32+32)]
    assert total == 8 * (16416 + 16896 + 24608 + 25344 + 1056) == 674_560
    assert set(text.state_dict()) == {f"{i}.{k}" for i in range(5, 13)
                                      for k in ("down.0.weight", "down.0.bias", "up.weight", "up.bias")}
    assert set(shared.state_dict()) == {f"{i}.0.{k}" for i in range(5, 13) for k in ("weight", "bias")}


def test_initialisation_kaiming_fan_out_zero_bias():
    torch.manual_seed(0)
    adapters = _build_adapters(768, 12, 1, 12, 32)
    downs = torch.cat([adapters[i].down[0].weight.flatten() for i in range(1, 13)])
    ups = torch.cat([adapters[i].up.weight.flatten() for i in range(1, 13)])
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / fan_out); down: fan_out 32, up: fan_out 768
    assert downs.std().item() == pytest.approx((2 / 32) ** 0.5, rel=0.03)
    assert ups.std().item() == pytest.approx((2 / 768) ** 0.5, rel=0.03)
    assert all((adapters[i].down[0].bias == 0).all() and (adapters[i].up.bias == 0).all() for i in range(1, 13))


# -- an independent reference from the paper's equations -------------------------------------
def _adapter(a, s, x, scale):
    h = F.relu(F.linear(x, a.down[0].weight, a.down[0].bias))
    h = F.relu(F.linear(h, s[0].weight, s[0].bias))
    return scale * F.linear(h, a.up.weight, a.up.bias)


def _reference_logits(clip, learner, images, names, scale):
    """x_{i} = Block_i(x_{i-1}) + scale * up(shared(down(ln_1^i(x_{i-1})))) for i in 5..12."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks, 1):
        extra = _adapter(learner.visual_adapter[i], learner.shared_adapter[i], block.ln_1(x), scale) \
            if learner.visual_adapter[i] is not None else 0
        x = block(x) + extra
    img = v.ln_post(x[:, 0]) @ v.proj

    tokens = tokenize([f"a photo of a {n.replace('_', ' ')}." for n in names])
    t = clip.token_embedding(tokens) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks, 1):
        extra = _adapter(learner.text_adapter[i], learner.shared_adapter[i], block.ln_1(t), scale) \
            if learner.text_adapter[i] is not None else 0
        t = block(t, attn_mask=clip.attn_mask) + extra
    t = clip.ln_final(t)[torch.arange(len(names)), tokens.argmax(-1)] @ clip.text_projection
    return clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(t, dim=-1).t()


@pytest.mark.parametrize("scale", [0.001, 0.1])
def test_logits_and_gradient_scaling_rule(tiny_clip, scale):
    # the rule is exact: both sides in float64, so that a tight bound is honest
    model = _mma(tiny_clip, ADAPTER_SCALE=scale).double()
    _perturb(model)
    model.train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    labels = torch.tensor([0, 3, 1])

    img_a = images.clone().requires_grad_(True)
    loss = F.cross_entropy(model(img_a), labels)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.adapter_learner.named_parameters()}

    ref_learner = copy.deepcopy(model.adapter_learner)
    ref_learner.zero_grad()
    img_b = images.clone().requires_grad_(True)
    ref_logits = _reference_logits(model.clip, ref_learner, img_b, NAMES, scale)
    F.cross_entropy(ref_logits, labels).backward()

    forward, backward = clip_ops(model.clip), clip_ops(model.clip, passes=2)
    with torch.no_grad():
        model.eval()
        assert_close(model(images), ref_logits, ops=forward, what="logits")
    # the adapters get 1/scale times the true gradient ...
    for name, p in ref_learner.named_parameters():
        assert p.grad.abs().sum() > 0, name
        assert_close(ours[name], p.grad / scale, ops=backward, what=name)
    # ... while gradients into the backbone (here: into the input images) are unchanged
    assert img_b.grad.abs().max() > 0
    assert_close(img_a.grad, img_b.grad, ops=backward, what="image gradient")


def test_eval_text_cache_follows_classnames(tiny_clip):
    model = _mma(tiny_clip)
    _perturb(model)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        five = model(images)
        model.set_classnames(NAMES[:2])
        two = model(images)
    assert five.shape == (2, 5) and two.shape == (2, 2)
    assert_close(two, five[:, :2], ops=clip_ops(tiny_clip))  # a text batch of another size


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = _mma(tiny_clip)
    _perturb(trained, seed=7)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "adapter_learner" / "model.pth.tar-5", 5)
    raw = torch.load(path, weights_only=True)
    # the official layout: adapter_learner's own names, class-dependent buffers included
    assert {"text_adapter.5.down.0.weight", "visual_adapter.12.up.bias", "shared_adapter.5.0.weight",
            "token_embedding", "tokenized_prompts"} <= set(raw["state_dict"])

    fresh = _mma(copy.deepcopy(tiny_clip), names=["x", "y"])  # other classes: buffers are rebuilt
    extra = benchmark.load_official_checkpoint(fresh, path)
    assert extra["epoch"] == 5
    for (n, a), (_, b) in zip(trained.adapter_learner.named_parameters(), fresh.adapter_learner.named_parameters()):
        assert torch.equal(a, b), n
    fresh.set_classnames(NAMES)
    trained.eval(), fresh.eval()
    assert_restored(fresh, trained, torch.randn(4, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


def test_checkpoint_of_other_architecture_is_refused(tiny_clip, tmp_path):
    path = tmp_path / "model.pth.tar-5"
    other = _mma(tiny_clip, ADAPTER_DIM=16)
    benchmark.save_official_checkpoint(other, path, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        benchmark.load_official_checkpoint(_mma(copy.deepcopy(tiny_clip)), path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        benchmark.load_official_checkpoint(_mma(copy.deepcopy(tiny_clip)), tmp_path / "junk.pth")
