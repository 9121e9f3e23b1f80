"""Every registered method, built on the tiny CLIP: forward, backward, declared parameters;
and CoOp's prompts against CLIP's own text encoder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale

import benchmark
from benchmark.backbone import tokenize
from methods.registry import get_method, list_methods

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
# the methods of the repository (test modules register probes of their own, in any order)
SHIPPED = [n for n in list_methods() if get_method(n).cls.__module__.startswith("methods.")]


@pytest.mark.parametrize("name", SHIPPED)
def test_method_trains_exactly_its_declared_parameters(name, tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build(name, NAMES, clip=tiny_clip)
    if name == "clip_lora":  # LoRA's B starts at zero (official), which leaves A without a first gradient
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("w_lora_B"):
                    p.normal_(0, 0.02)
    model.train()
    images = torch.randn(8, 3, 32, 32)  # enough images that small ReLU layers (CoCoOp's meta-net) get gradients
    logits = model(images)
    assert logits.shape == (8, len(NAMES)) and torch.isfinite(logits).all()
    declared = {n for n, p in model.named_parameters() if any(n.startswith(t) for t in model.trainable)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    if declared:
        model.loss(logits, torch.tensor([0, 2, 1, 0, 2, 1, 0, 1])).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == declared
    model.eval()
    model.set_classnames(["fox", "wolf"])
    with torch.no_grad():
        assert model(images).shape == (8, 2)


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
        assert_close(model(images), expected, ops=clip_ops(tiny_clip))


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
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


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


def _official_meta_net(learner, feature):
    """The official meta-net written out on the learner's weights (not its module): Linear(d, d // 16),
    ReLU, Linear(d // 16, width) of one normalised image feature (d,) -> one bias (width,)."""
    net = learner.meta_net
    hidden = torch.clamp(net.linear1.weight @ feature + net.linear1.bias, min=0)
    return net.linear2.weight @ hidden + net.linear2.bias


def _official_cocoop_logits(model, clip, images):
    """CoCoOp as the official trainer computes it: one text-encoder pass per image, whose context
    is the learned one with the image's meta-net bias added to every vector."""
    learner = model.prompt_learner
    image = F.normalize(clip.encode_image(images), dim=-1)
    tokens = learner.tokenized_prompts
    n_ctx = learner.n_ctx
    rows = []
    for feature in image:
        ctx = learner.ctx + _official_meta_net(learner, feature).unsqueeze(0)  # (M, width)
        x = clip.token_embedding(tokens)
        x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), x[:, 1 + n_ctx:]], dim=1)
        x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ clip.text_projection
        rows.append(clip.logit_scale.exp() * feature @ F.normalize(x, dim=-1).t())
    return torch.stack(rows)


def test_cocoop_meta_net_and_per_image_prompts(tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build("cocoop", NAMES, clip=tiny_clip, N_CTX=4, CTX_INIT="a photo of a")
    learner = model.prompt_learner
    d, width = tiny_clip.visual.output_dim, tiny_clip.ln_final.weight.shape[0]
    assert learner.ctx.shape == (4, width)
    assert learner.meta_net.linear1.weight.shape == (d // 16, d) and learner.meta_net.linear2.weight.shape == (width, d // 16)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        # a silent meta-net leaves CoOp's initial prompt: the written sentence
        learner.meta_net.linear2.weight.zero_()
        learner.meta_net.linear2.bias.zero_()
        expected = _clip_logits(tiny_clip, images, [f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
        assert_close(model(images), expected, ops=clip_ops(tiny_clip))
        # a live meta-net: each image's own prompts, as the official per-image loop (hidden units
        # on both sides of the ReLU's kink, so that the nonlinearity matters)
        learner.meta_net.linear1.weight.normal_(0, 1.0)
        learner.meta_net.linear1.bias.zero_()
        learner.meta_net.linear2.weight.normal_(0, 0.5)
        learner.meta_net.linear2.bias.normal_(0, 0.5)
        batched = model(images)
        hidden = F.normalize(tiny_clip.encode_image(images), dim=-1) @ learner.meta_net.linear1.weight.t()
        assert (hidden > 0).any() and (hidden < 0).any()
        official = _official_cocoop_logits(model, tiny_clip, images)
    assert_close(batched, official, ops=clip_ops(tiny_clip))
    assert not torch.allclose(batched, expected, atol=1e-2)  # the shift changes the logits
    # gradients of the batched pass equal the loop's
    labels = torch.tensor([0, 2, 1])
    F.cross_entropy(model(images), labels).backward()
    grads = [p.grad.clone() for p in learner.parameters() if p.requires_grad]
    model.zero_grad()
    F.cross_entropy(_official_cocoop_logits(model, tiny_clip, images), labels).backward()
    for got, want in zip(grads, [p.grad for p in learner.parameters() if p.requires_grad]):
        assert_close(got, want, ops=clip_ops(tiny_clip, passes=2))


def test_cocoop_official_checkpoint_round_trip(tiny_clip, tmp_path):
    torch.manual_seed(1)
    trained = benchmark.build("cocoop", NAMES, clip=tiny_clip, N_CTX=4, CTX_INIT="a photo of a")
    path = benchmark.save_official_checkpoint(trained, tmp_path / "prompt_learner" / "model.pth.tar-10", 10)
    keys = set(torch.load(path, weights_only=True)["state_dict"])
    assert keys == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                    "meta_net.linear2.bias", "token_prefix", "token_suffix"}
    torch.manual_seed(2)
    fresh = benchmark.build("cocoop", ["x", "y"], clip=copy.deepcopy(tiny_clip), N_CTX=4, CTX_INIT="a photo of a")
    benchmark.load_official_checkpoint(fresh, path)
    fresh.set_classnames(NAMES)
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
