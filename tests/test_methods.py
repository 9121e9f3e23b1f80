"""Every registered method, built on the tiny CLIP: forward, backward, declared parameters;
and CoOp's prompts against CLIP's own text encoder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import benchmark
from benchmark.backbone import tokenize
from methods.registry import list_methods

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]


@pytest.mark.parametrize("name", list_methods())
def test_method_trains_exactly_its_declared_parameters(name, tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build(name, NAMES, clip=tiny_clip)
    model.train()
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, len(NAMES)) and torch.isfinite(logits).all()
    declared = {n for n, p in model.named_parameters() if any(n.startswith(t) for t in model.trainable)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    if declared:
        model.loss(logits, torch.tensor([0, 2])).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == declared
    model.eval()
    model.set_classnames(["fox", "wolf"])
    with torch.no_grad():
        assert model(images).shape == (2, 2)


def _clip_logits(clip, images, texts):
    image = F.normalize(clip.encode_image(images), dim=-1)
    text = F.normalize(clip.encode_text(tokenize(texts)), dim=-1)
    return clip.logit_scale.exp() * image @ text.t()


@pytest.mark.parametrize("position,form", [("end", "a photo of a {}."), ("middle", "a photo {} of a."),
                                           ("front", "{} a photo of a.")])
def test_coop_prompt_layout_equals_the_written_prompt(tiny_clip, position, form):
    """With the context still at its "a photo of a" initialisation, CoOp's prompt is exactly
    the sentence with the class name in the configured place."""
    model = benchmark.build("coop", NAMES, clip=tiny_clip, CTX_INIT="a photo of a",
                            CLASS_TOKEN_POSITION=position)
    assert model.prompt_learner.ctx.shape == (4, tiny_clip.ln_final.weight.shape[0])
    images = torch.randn(3, 3, 32, 32)
    expected = _clip_logits(tiny_clip, images, [form.format(n.replace("_", " ")) for n in NAMES])
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_coop_random_context_and_class_specific(tiny_clip):
    torch.manual_seed(0)
    generic = benchmark.build("coop", NAMES, clip=tiny_clip, N_CTX=16, CTX_INIT="")
    assert generic.prompt_learner.ctx.shape == (16, 64)
    assert generic.prompt_learner.ctx.std().item() == pytest.approx(0.02, rel=0.1)
    csc = benchmark.build("coop", NAMES, clip=tiny_clip, N_CTX=8, CTX_INIT="", CSC=True)
    assert csc.prompt_learner.ctx.shape == (3, 8, 64)
    with pytest.raises(ValueError, match="Class-specific"):
        csc.set_classnames(["a", "b"])


def test_coop_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = benchmark.build("coop", NAMES, clip=tiny_clip, CTX_INIT="a photo of a")
    with torch.no_grad():
        trained.prompt_learner.ctx.add_(0.1 * torch.randn_like(trained.prompt_learner.ctx))
    path = benchmark.save_official_checkpoint(trained, tmp_path / "prompt_learner" / "model.pth.tar-200", 200)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == {"ctx", "token_prefix", "token_suffix"}
    fresh = benchmark.build("coop", ["x", "y"], clip=copy.deepcopy(tiny_clip), CTX_INIT="a photo of a")
    benchmark.load_official_checkpoint(fresh, path)
    fresh.set_classnames(NAMES)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(images), fresh(images))


def _official_coop_file(path, ctx):
    """A checkpoint as the official trainer writes it after a warm-up run: the scheduler
    state holds the pickled successor scheduler object (and through it the optimiser)."""
    param = torch.nn.Parameter(ctx.clone())
    optim = torch.optim.SGD([param], lr=0.002, momentum=0.9, weight_decay=5e-4)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=200.0)
    scheduler = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": 200}
    torch.save({"state_dict": {"ctx": param.detach(), "token_prefix": torch.zeros(1), "token_suffix": torch.zeros(1)},
                "epoch": 200, "optimizer": optim.state_dict(), "scheduler": scheduler, "val_result": None}, path)


def test_official_checkpoint_with_scheduler_objects_loads_safely(tiny_clip, tmp_path):
    import os

    model = benchmark.build("coop", NAMES, clip=tiny_clip, CTX_INIT="a photo of a")
    ctx = torch.randn_like(model.prompt_learner.ctx)
    _official_coop_file(tmp_path / "model.pth.tar-200", ctx)
    assert benchmark.load_official_checkpoint(model, tmp_path / "model.pth.tar-200")["epoch"] == 200
    assert torch.equal(model.prompt_learner.ctx, ctx)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"state_dict": {"ctx": ctx}, "extra": Payload()}, tmp_path / "evil.pth.tar")
    with pytest.raises(ValueError, match="posix.system|refusing"):
        benchmark.load_official_checkpoint(model, tmp_path / "evil.pth.tar")
