"""KgCoOp: the regularised loss, its initial value, where its gradient goes, class names
and the official checkpoint layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale, ops

import benchmark
import methods.kgcoop  # noqa: F401  (registers the method)
from benchmark.backbone import tokenize
from benchmark.models import dataset_context
from datasets.worlds import dataset_template
from methods.kgcoop import handcrafted_template

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
PETS = "a photo of a {}, a type of pet."


def _kgcoop(clip, names=NAMES, dataset="oxford_pets", **kw):
    torch.manual_seed(0)
    return benchmark.build("kgcoop", names, clip=clip, dataset=dataset, **kw)


def _perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ctx = model.prompt_learner.ctx
        ctx.add_(scale * torch.randn(ctx.shape, generator=g))


def _learned_text(clip, ctx, names):
    """The official prompts by hand: the embeddings of "a photo of a <name>." with the
    four context words replaced by ``ctx``, through CLIP's text transformer."""
    tokens = tokenize([f"a photo of a {n.replace('_', ' ')}." for n in names])
    x = clip.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
    x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
    return clip.ln_final(x)[torch.arange(len(names)), tokens.argmax(-1)] @ clip.text_projection


def _handcrafted(clip, template, names):
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokenize([template.format(n.replace("_", " ")) for n in names])), dim=-1)


def test_config_and_initialisation(tiny_clip):
    model = _kgcoop(tiny_clip)
    opts = model.options
    assert (opts.W, opts.N_CTX, opts.CSC, opts.CTX_INIT, opts.PREC) == (8.0, 4, False, True, "fp16")
    assert model.cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 128 and model.cfg.OPTIM.MAX_EPOCH == 100
    # CTX_INIT is a switch: the context starts from the embeddings of "a photo of a"
    words = tiny_clip.token_embedding(tokenize(["a photo of a"]))[0, 1:5]
    assert torch.equal(model.prompt_learner.ctx, words)  # copied rows
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_learner.ctx"}
    # without it: N_CTX random vectors, std 0.02
    torch.manual_seed(0)
    rand = benchmark.build("kgcoop", NAMES, clip=tiny_clip, CTX_INIT=False, N_CTX=16)
    assert rand.prompt_learner.ctx.shape == (16, tiny_clip.ln_final.weight.shape[0])
    assert rand.prompt_learner.ctx.std().item() == pytest.approx(0.02, rel=0.1)


def test_handcrafted_templates():
    # the official table: the zero-shot templates, except DTD's
    assert handcrafted_template(dataset_context("dtd")) == "a photo of a {}, a type of texture."
    assert dataset_template("dtd") == "{} texture."
    for name in ("oxford_pets", "eurosat", "food101", "ucf101", "imagenet", "imagenet_r", "caltech101"):
        assert handcrafted_template(dataset_context(name)) == dataset_template(name)
    assert handcrafted_template(dataset_context("oxford_pets")) == PETS


def test_loss_is_cross_entropy_plus_weighted_cosine_gap(tiny_clip):
    model = _kgcoop(tiny_clip)
    _perturb(model)
    model.train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1, 2])
    logits = model(images)
    loss = model.loss(logits, labels)

    clip = model.clip
    with torch.no_grad():
        text = F.normalize(_learned_text(clip, model.prompt_learner.ctx, NAMES), dim=-1)
        image = F.normalize(clip.encode_image(images), dim=-1)
        ref_logits = clip.logit_scale.exp() * image @ text.t()
        hand = _handcrafted(clip, PETS, NAMES)
        gap = 1 - (text * hand).sum(-1).mean()
        expected = F.cross_entropy(ref_logits, labels) + 8.0 * gap
    forward = clip_ops(clip)
    assert_close(logits, ref_logits, ops=forward, what="logits")
    assert gap > 1e-4  # the perturbed context is away from the hand-crafted prompt
    assert_close(loss, expected, ops=forward, what="loss")
    # W scales only the regulariser
    model.weight = 0.0
    assert_close(model.loss(logits, labels), F.cross_entropy(ref_logits, labels), ops=forward, what="loss, W = 0")


def test_regulariser_vanishes_at_init_with_the_same_template(tiny_clip):
    # ImageNet's hand-crafted prompt "a photo of a {}." is the initial learned prompt
    model = _kgcoop(tiny_clip, dataset="imagenet")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # 1 - cos of equal features: the rounding of the cosine itself (two normalisations, a product
    # of the text width, the mean), relative to a cosine's scale, 1
    width = tiny_clip.ln_final.weight.shape[0]
    assert_close(model._score, torch.zeros(()), ops=ops(width, depth=3), scale=1.0, what="score")
    # Oxford Pets' template differs from the initial prompt: the gap is positive
    pets = _kgcoop(copy.deepcopy(tiny_clip), dataset="oxford_pets")
    with torch.no_grad():
        pets(torch.randn(2, 3, 32, 32))
    assert pets._score.item() > 1e-4


def test_regulariser_gradient_reaches_only_the_context(tiny_clip):
    # a check of the formula's gradient: both sides in float64, so that a tight bound is honest
    model = _kgcoop(tiny_clip.double())
    _perturb(model)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    (model.weight * model._score).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"prompt_learner.ctx"}
    assert not model.handcrafted_features.requires_grad
    # ... and equals the gradient of the independent formula
    ctx = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
    text = F.normalize(_learned_text(model.clip, ctx, NAMES), dim=-1)
    gap = 1 - (text * _handcrafted(model.clip, PETS, NAMES)).sum(-1).mean()
    (8.0 * gap).backward()
    assert grads["prompt_learner.ctx"].dtype == torch.float64
    assert_close(grads["prompt_learner.ctx"], ctx.grad, ops=clip_ops(model.clip, passes=2), what="context gradient")


def test_set_classnames_refreshes_the_handcrafted_features(tiny_clip):
    model = _kgcoop(tiny_clip)
    text = clip_ops(tiny_clip)  # the model's text pass may be the truncated one
    assert_close(model.handcrafted_features, _handcrafted(tiny_clip, PETS, NAMES), ops=text)
    model.set_classnames(["fox", "wolf"])
    assert_close(model.handcrafted_features, _handcrafted(tiny_clip, PETS, ["fox", "wolf"]), ops=text)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2)
    assert model._score is not None and model._score.ndim == 0


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = _kgcoop(tiny_clip)
    _perturb(trained, scale=0.2)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "prompt_learner" / "model.pth.tar-100", 100)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == {"ctx", "token_prefix", "token_suffix"}
    fresh = _kgcoop(copy.deepcopy(tiny_clip), names=["x", "y"])
    assert benchmark.load_official_checkpoint(fresh, path)["epoch"] == 100
    fresh.set_classnames(NAMES)
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


def test_official_file_with_unused_parameters_loads(tiny_clip, tmp_path):
    """The official prompt learner also saves ``bias_vectors`` (1 x 512) and a
    ``meta_net.linear1`` (512 -> 512) that its forward never uses."""
    model = _kgcoop(tiny_clip)
    ctx = torch.randn_like(model.prompt_learner.ctx)
    state = {"ctx": ctx, "bias_vectors": torch.randn(1, 512), "meta_net.linear1.weight": torch.randn(512, 512),
             "meta_net.linear1.bias": torch.randn(512), "token_prefix": torch.zeros(5, 1, 64),
             "token_suffix": torch.zeros(5, 72, 64)}
    torch.save({"state_dict": state, "epoch": 100, "optimizer": None, "scheduler": None}, tmp_path / "model.pth.tar-100")
    benchmark.load_official_checkpoint(model, tmp_path / "model.pth.tar-100")
    assert torch.equal(model.prompt_learner.ctx, ctx)
