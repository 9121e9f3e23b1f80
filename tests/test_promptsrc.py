"""PromptSRC on the tiny CLIP: prompt placement and logits against a plain re-implementation
of the official independent vision-language prompt blocks, every loss term, initialisation,
Gaussian prompt aggregation (hooks and a real training run), official checkpoints, novel
classes and the per-protocol configs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerance import approx, assert_close, assert_restored, clip_ops, logit_scale, ops

import benchmark
import methods.promptsrc  # noqa: F401  (registers the method)
from benchmark.backbone import tokenize
from benchmark.precision import cast_clip
from benchmark.trainer import train
from datasets.build import build_dataset
from methods.registry import MethodError

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]


# -- a plain re-implementation of the official computation -------------------------------------
def _block(block, x, mask=None):
    """One pre-LN residual block with explicit multi-head attention (batch-first)."""
    attn = block.attn
    heads, (n, length, width) = attn.num_heads, x.shape
    h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + out @ attn.out_proj.weight.t() + attn.out_proj.bias
    h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    h = h @ block.mlp.c_fc.weight.t() + block.mlp.c_fc.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + h @ block.mlp.c_proj.weight.t() + block.mlp.c_proj.bias


def _official_text(clip, ctx, deep, names, prefix="a photo of a", n_ctx=4):
    """[SOS] ctx [rest of "prefix name."]; block i >= 1 with a prompt replaces rows 1..n_ctx."""
    tokens = tokenize([f"{prefix} {n.replace('_', ' ')}." for n in names])
    emb = clip.token_embedding(tokens)
    x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), emb[:, 1 + n_ctx:]], dim=1)
    x = x + clip.positional_embedding
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for i, block in enumerate(clip.transformer.resblocks):
        if i in deep:
            x = torch.cat([x[:, :1], deep[i].unsqueeze(0).expand(len(names), -1, -1), x[:, 1 + n_ctx:]], dim=1)
        x = _block(block, x, mask)
    x = F.layer_norm(x, x.shape[-1:], clip.ln_final.weight, clip.ln_final.bias)
    return x[torch.arange(len(names)), tokens.argmax(dim=-1)] @ clip.text_projection


def _official_image(clip, images, vpt=None, deep=None):
    """Patches + CLS + positions, then the image prompts appended; block i >= 1 with a prompt
    replaces the last rows."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(images), 1, -1), x], dim=1) + v.positional_embedding
    if vpt is not None:
        x = torch.cat([x, vpt.unsqueeze(0).expand(len(images), -1, -1)], dim=1)
    x = F.layer_norm(x, x.shape[-1:], v.ln_pre.weight, v.ln_pre.bias)
    for i, block in enumerate(v.transformer.resblocks):
        if deep and i in deep:
            x = torch.cat([x[:, :-len(deep[i])], deep[i].unsqueeze(0).expand(len(images), -1, -1)], dim=1)
        x = _block(block, x)
    return F.layer_norm(x[:, 0], x.shape[-1:], v.ln_post.weight, v.ln_post.bias) @ v.proj


def _prompts(model):
    pl = model.prompt_learner
    return (pl.ctx, {int(i): p for i, p in pl.text_deep.items()},
            getattr(pl, "vpt", None), {int(i): p for i, p in pl.vpt_deep.items()})


def _official_logits(model, clip, images, names=NAMES):
    ctx, text_deep, vpt, vpt_deep = _prompts(model)
    text = F.normalize(_official_text(clip, ctx, text_deep, names, n_ctx=model.prompt_learner.n_ctx), dim=-1)
    image = F.normalize(_official_image(clip, images, vpt, vpt_deep), dim=-1)
    return clip.logit_scale.exp() * image @ text.t()


def _perturb(model, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


TEMPLATES_FIRST_LAST = ("a photo of a {}.", "itap of the {}.")


@pytest.fixture(scope="module")
def reference_fixed(_tiny_clip_master):
    """The official frozen text features for NAMES: one encoder pass per template, the
    unnormalised features averaged over the 60 templates, then normalised."""
    templates = methods.promptsrc.IMAGENET_TEMPLATES
    names = [n.replace("_", " ") for n in NAMES]
    with torch.no_grad():
        per_template = [_tiny_clip_master.encode_text(tokenize([t.replace("{}", n) for n in names]))
                        for t in templates]
    return F.normalize(torch.stack(per_template, dim=1).mean(dim=1), dim=-1)


# -- placement and logits ---------------------------------------------------------------------
def test_input_prompts_at_init_are_the_written_prompt(tiny_clip):
    """Text depth 1 and no image prompts: the context from "a photo of a" gives CLIP's zero-shot
    logits for "a photo of a {name}." exactly."""
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip, PROMPT_DEPTH_TEXT=1, PROMPT_DEPTH_VISION=0)
    assert len(model.prompt_learner.text_deep) == 0 and not hasattr(model.prompt_learner, "vpt")
    images = torch.randn(3, 3, 32, 32)
    text = F.normalize(tiny_clip.encode_text(tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])), dim=-1)
    image = F.normalize(tiny_clip.encode_image(images), dim=-1)
    with torch.no_grad():
        assert_close(model.eval()(images), tiny_clip.logit_scale.exp() * image @ text.t(), ops=clip_ops(tiny_clip))


@pytest.mark.parametrize("depth_text,depth_vision", [(9, 9), (3, 3), (2, 0), (12, 1)])
def test_deep_prompts_match_the_official_blocks(tiny_clip, depth_text, depth_vision):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip, PROMPT_DEPTH_TEXT=depth_text,
                            PROMPT_DEPTH_VISION=depth_vision)
    pl = model.prompt_learner
    assert sorted(int(i) for i in pl.text_deep) == list(range(1, depth_text))
    assert sorted(int(i) for i in pl.vpt_deep) == list(range(1, max(depth_vision, 1)))
    _perturb(model)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = model.eval()(images)
        assert_close(got, _official_logits(model, tiny_clip, images), ops=clip_ops(tiny_clip))
        if depth_vision:  # the image prompts matter (they would not if they were dropped)
            assert not torch.allclose(model.encode_image(images), model.encode_image(images, prompted=False), atol=1e-3)


def test_gradients_equal_the_official_computation(tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    _perturb(model, 0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 1])
    F.cross_entropy(model.eval()(images), labels).backward()
    got = {n: p.grad.clone() for n, p in model.prompt_learner.named_parameters()}
    model.zero_grad()
    F.cross_entropy(_official_logits(model, tiny_clip, images), labels).backward()
    for name, p in model.prompt_learner.named_parameters():
        assert_close(got[name], p.grad, ops=clip_ops(tiny_clip, passes=2), what=name)


# -- the loss ---------------------------------------------------------------------------------
def test_every_loss_term(tiny_clip, reference_fixed):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    _perturb(model, 0.2)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 2, 1, 1, 0])
    model.train()
    logits = model(images)
    extras = dict(model._extras)
    loss = model.loss(logits, labels)

    with torch.no_grad():
        # frozen text features: CLIP's features averaged over the 60 ImageNet templates, then normalised
        templates = methods.promptsrc.IMAGENET_TEMPLATES
        assert len(templates) == 60 and (templates[0], templates[-1]) == TEMPLATES_FIRST_LAST
        fixed = reference_fixed
        zs_image = F.normalize(tiny_clip.encode_image(images), dim=-1)
        zs_logits = tiny_clip.logit_scale.exp() * zs_image @ fixed.t()
        ctx, text_deep, vpt, vpt_deep = _prompts(model)
        text = F.normalize(_official_text(tiny_clip, ctx, text_deep, NAMES), dim=-1)
        image = F.normalize(_official_image(tiny_clip, images, vpt, vpt_deep), dim=-1)
        forward = clip_ops(tiny_clip)
        assert_close(extras["fixed"], fixed, ops=forward + ops(len(templates)), what="fixed")  # + the template mean
        assert_close(extras["zs_image"], zs_image, ops=forward, what="zs_image")
        assert_close(extras["zs_logits"], zs_logits, ops=forward + ops(len(templates)), what="zs_logits")
        assert_close(extras["text"], text, ops=forward, what="text")
        assert_close(extras["image"], image, ops=forward, what="image")

        ce = -logits.log_softmax(1)[torch.arange(5), labels].mean()
        l1_text = 25 * (text - fixed).abs().mean()
        l1_image = 10 * (image - zs_image).abs().mean()
        p_zs = zs_logits.softmax(1)
        kl = (p_zs * (zs_logits.log_softmax(1) - logits.log_softmax(1))).sum() / logits.numel()
    assert l1_text > 0.1 and l1_image > 0.1 and kl > 1e-3  # every term is alive here
    assert_close(loss, ce + l1_text + l1_image + kl, ops=forward, what="loss")
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.loss(logits, labels)  # the stored features are used once


def test_loss_weights_come_from_the_config(tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    _perturb(model, 0.2)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    model.train()
    logits = model(images)
    extras = dict(model._extras)
    losses = {}
    model.cfg.defrost()
    for text_w, image_w in [(0, 0), (25, 0), (0, 10)]:
        model.options.TEXT_LOSS_WEIGHT, model.options.IMAGE_LOSS_WEIGHT = text_w, image_w
        model._extras = dict(extras)
        losses[text_w, image_w] = model.loss(logits, labels).item()
    text_term = 25 * (extras["text"] - extras["fixed"]).abs().mean().item()
    image_term = 10 * (extras["image"] - extras["zs_image"]).abs().mean().item()
    # float32 sums of the same terms: a mean over the features, its weight, the additions
    assert losses[25, 0] == approx(losses[0, 0] + text_term, ops=ops(extras["text"].numel(), depth=3))
    assert losses[0, 10] == approx(losses[0, 0] + image_term, ops=ops(extras["image"].numel(), depth=3))


# -- initialisation -----------------------------------------------------------------------------
def test_initialisation_rules(tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    pl = model.prompt_learner
    emb = tiny_clip.token_embedding(tokenize(["a photo of a"]))[0, 1:5]
    assert torch.equal(pl.ctx, emb) and pl.prefix_text == "a photo of a"
    deep = torch.cat([p.flatten() for p in [pl.vpt, *pl.vpt_deep.values(), *pl.text_deep.values()]])
    assert deep.std().item() == pytest.approx(0.02, rel=0.1) and abs(deep.mean().item()) < 0.003
    assert pl.vpt.shape == (4, 128) and pl.text_deep["8"].shape == (4, 64) and "9" not in pl.text_deep
    # 4 x (64 + 128) per layer, 9 layers per tower (the paper's 46K on ViT-B/16 is 4 x (512 + 768) x 9)
    assert sum(p.numel() for p in model.trainable_parameters()) == 4 * (64 + 128) * 9

    # two vectors from "a photo of a": only "a photo" is learned; "of a" stays in the prompt
    two = benchmark.build("promptsrc", NAMES, clip=copy.deepcopy(tiny_clip), N_CTX_TEXT=2,
                          PROMPT_DEPTH_TEXT=1, PROMPT_DEPTH_VISION=0)
    assert torch.equal(two.prompt_learner.ctx, emb[:2])
    images = torch.randn(2, 3, 32, 32)
    text = F.normalize(tiny_clip.encode_text(tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])), dim=-1)
    with torch.no_grad():
        expected = tiny_clip.logit_scale.exp() * F.normalize(tiny_clip.encode_image(images), dim=-1) @ text.t()
        assert_close(two.eval()(images), expected, ops=clip_ops(tiny_clip))

    # more than four vectors: random context and "X X ... X" placeholders
    six = benchmark.build("promptsrc", NAMES, clip=copy.deepcopy(tiny_clip), N_CTX_TEXT=6)
    assert six.prompt_learner.prefix_text == "X X X X X X" and six.prompt_learner.ctx.shape == (6, 64)
    assert six.prompt_learner.text_deep["1"].shape == (6, 64)
    with pytest.raises(MethodError, match="PROMPT_DEPTH_TEXT"):
        benchmark.build("promptsrc", NAMES, clip=copy.deepcopy(tiny_clip), PROMPT_DEPTH_TEXT=0)


def test_half_precision_layout(tiny_clip):
    """fp16 (the official configs): CLIP and the text context in half precision, the other
    prompts fp32; the frozen text features come from an fp32 copy of the text tower."""
    ref = copy.deepcopy(tiny_clip)
    clip = cast_clip(tiny_clip, "fp16")
    model = benchmark.build("promptsrc", NAMES[:2], clip=clip, PROMPT_DEPTH_TEXT=2, PROMPT_DEPTH_VISION=2)
    pl = model.prompt_learner
    assert pl.ctx.dtype == torch.float16 and pl.token_prefix.dtype == torch.float16
    assert {p.dtype for p in [pl.vpt, *pl.vpt_deep.values(), *pl.text_deep.values()]} == {torch.float32}
    fixed = model.frozen_text_features()
    assert fixed.dtype == torch.float32 and clip.text_projection.dtype == torch.float16  # CLIP itself untouched
    rounded = benchmark.build("promptsrc", NAMES[:2], clip=cast_clip(ref, "fp16").float(),
                              PROMPT_DEPTH_TEXT=2, PROMPT_DEPTH_VISION=2)  # fp16-rounded weights in fp32
    # features of the half-precision weights widened, not computed in half precision (that is off by
    # fp16 roundings, far beyond this fp32 bound)
    assert_close(fixed, rounded.frozen_text_features(), ops=clip_ops(ref))
    model.train()
    images = torch.randn(2, 3, 32, 32)
    logits = model(images.half())
    assert logits.dtype == torch.float16 and model._extras["zs_logits"].dtype == torch.float16
    model.loss(logits, torch.tensor([0, 1])).backward()
    assert pl.ctx.grad.dtype == torch.float16 and pl.vpt.grad.dtype == torch.float32


# -- Gaussian prompt aggregation --------------------------------------------------------------
def test_gpa_weights():
    w = methods.promptsrc.gpa_weights(20, 15, 1)
    dens = np.exp(-0.5 * (np.arange(1, 21) - 15.0) ** 2)
    budget = ops(len(w), depth=3)  # float64: the densities, their sum, the division
    assert w.sum() == approx(1.0, ops=budget, dtype=torch.float64)
    assert_close(torch.as_tensor(w), torch.as_tensor(dens / dens.sum()), ops=budget)
    assert w.argmax() == 14 and w[13] == approx(w[15], ops=budget, dtype=torch.float64)
    wide = methods.promptsrc.gpa_weights(20, 6, 10)  # cross-dataset: nearly flat around epoch 6
    assert wide.argmax() == 5 and wide.min() > 0.3 * wide.max()


def test_gpa_hooks_aggregate_prompts_and_fold_the_frozen_weights(tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip, GPA_MEAN=2, GPA_STD=1)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    weights = methods.promptsrc.gpa_weights(3, 2, 1)
    snapshots = []
    for epoch in range(3):
        _perturb(model, 0.1, seed=epoch)
        snapshots.append({k: v.detach().clone() for k, v in model.prompt_learner.named_parameters()})
        model.on_epoch_end(epoch, 3)
    model.on_train_end()
    running_sum = ops(depth=2 * len(weights))  # elementwise: a product and an addition per epoch
    for name, p in model.prompt_learner.named_parameters():
        want = sum(float(w) * s[name] for w, s in zip(weights, snapshots))
        assert_close(p, want, ops=running_sum, what=name)
        assert not torch.allclose(p, snapshots[-1][name], atol=1e-4)
    # fp32: the frozen weights move by rounding only (positive weights: relative to each element);
    # the token embedding is not in the official model
    for key, value in model.clip.state_dict().items():
        assert_close(value, frozen[key], ops=running_sum, scale=0.0, what=key)
    assert torch.equal(model.clip.token_embedding.weight, frozen["token_embedding.weight"])
    assert model.get_extra_state() == {"frozen_gpa_weights": [float(w) for w in weights]}


def test_gpa_in_a_real_training_run(tiny_clip, synthetic_root):
    data = build_dataset("eurosat", synthetic_root, num_shots=2, seed=1, subsample="base")
    cfg = benchmark.make_config("promptsrc", "eurosat", GPA_MEAN=2, GPA_STD=1, **{
        "OPTIM.MAX_EPOCH": 3, "OPTIM.WARMUP_EPOCH": 0, "OPTIM.LR": 0.05, "DATALOADER.NUM_WORKERS": 0})
    cfg.INPUT.SIZE = (32, 32)
    cfg.freeze()
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", data.classnames, clip=tiny_clip, PROMPT_DEPTH_TEXT=3,
                            PROMPT_DEPTH_VISION=3, GPA_MEAN=2, GPA_STD=1)
    last_of_epoch = {}

    def on_step(epoch, batch, loss):
        last_of_epoch[epoch] = {k: v.detach().clone() for k, v in model.prompt_learner.named_parameters()}

    result = train(model, data.train, cfg, torch.device("cpu"), "fp32", on_step=on_step)
    assert len(result.epoch_losses) == 3 and all(math.isfinite(x) for x in result.epoch_losses)
    weights = methods.promptsrc.gpa_weights(3, 2, 1)
    for name, p in model.prompt_learner.named_parameters():
        want = sum(float(w) * last_of_epoch[e][name] for e, w in enumerate(weights))
        assert_close(p, want, ops=ops(depth=2 * len(weights)), what=name)  # a product and an addition per epoch
        assert not torch.allclose(p, last_of_epoch[2][name], atol=1e-6)  # not the last epoch's weights


# -- novel classes ---------------------------------------------------------------------------
def test_set_classnames_on_novel_classes(tiny_clip):
    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    _perturb(model)
    images = torch.randn(3, 3, 32, 32)
    novel = ["fox", "red wolf", "sea_lion", "kiwi"]
    model.eval()
    with torch.no_grad():
        model(images)  # fills the evaluation cache of the old classes
        model.set_classnames(novel)
        got = model(images)
        assert got.shape == (3, 4)
        assert_close(got, _official_logits(model, tiny_clip, images, novel), ops=clip_ops(tiny_clip))
    model.train()
    model(images)
    assert model._extras["fixed"].shape == (4, tiny_clip.visual.output_dim)


# -- official checkpoints ----------------------------------------------------------------------
def _official_state(clip, names_count, gen, depth=9, n_ctx=4):
    """A state dict laid out as the official trainer saves its whole model (registered as
    VLPromptLearner): prompts, class token rows, frozen CLIP, zero-shot image encoder copy."""
    sd = {"logit_scale": clip.logit_scale.detach().clone(),
          "prompt_learner.ctx": torch.randn(n_ctx, 64, generator=gen),
          "prompt_learner.token_prefix": torch.randn(names_count, 1, 64, generator=gen),
          "prompt_learner.token_suffix": torch.randn(names_count, 77 - 1 - n_ctx, 64, generator=gen),
          "image_encoder.VPT": torch.randn(n_ctx, 128, generator=gen)}
    for i in range(1, depth):
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, 128, generator=gen)
        sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, 64, generator=gen)
    for key, value in clip.state_dict().items():
        if key.startswith("visual."):
            sd["image_encoder." + key[len("visual."):]] = value.clone()
            sd["prompt_learner.ZS_image_encoder." + key[len("visual."):]] = value.clone()
        elif key not in ("logit_scale", "token_embedding.weight"):
            sd["text_encoder." + key] = value.clone()
    return sd


def test_official_checkpoint_file_loads(tiny_clip, tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = _official_state(tiny_clip, 7, gen)
    state["image_encoder.ln_post.weight"] = state["image_encoder.ln_post.weight"] * 1.001  # a GPA-moved frozen weight
    path = tmp_path / "VLPromptLearner" / "model.pth.tar-20"
    path.parent.mkdir()
    torch.save({"state_dict": state, "epoch": 20, "optimizer": None, "scheduler": None, "val_result": None}, path)

    model = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    assert set(model.official_layout.state_dict()) == set(state)  # the same layout both ways
    assert benchmark.load_official_checkpoint(model, path)["epoch"] == 20
    pl = model.prompt_learner
    assert torch.equal(pl.ctx, state["prompt_learner.ctx"]) and torch.equal(pl.vpt, state["image_encoder.VPT"])
    assert torch.equal(pl.vpt_deep["8"], state["image_encoder.transformer.resblocks.8.VPT_shallow"])
    assert torch.equal(pl.text_deep["1"], state["text_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(model.clip.visual.ln_post.weight, state["image_encoder.ln_post.weight"])
    assert pl.token_prefix.shape[0] == len(NAMES)  # the file's class rows are dropped
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model.eval()(images), _official_logits(model, model.clip, images), ops=clip_ops(model.clip))

    shallow = benchmark.build("promptsrc", NAMES, clip=copy.deepcopy(tiny_clip), PROMPT_DEPTH_TEXT=3,
                              PROMPT_DEPTH_VISION=3)
    with pytest.raises(MethodError, match="unexpected keys"):
        benchmark.load_official_checkpoint(shallow, path)


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    torch.manual_seed(1)
    trained = benchmark.build("promptsrc", NAMES, clip=tiny_clip)
    _perturb(trained)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "VLPromptLearner" / "model.pth.tar-20", 20)
    keys = set(torch.load(path, weights_only=True)["state_dict"])
    assert {"prompt_learner.ctx", "prompt_learner.token_prefix", "image_encoder.VPT", "logit_scale",
            "text_encoder.transformer.resblocks.8.VPT_shallow", "image_encoder.proj",
            "prompt_learner.ZS_image_encoder.conv1.weight", "text_encoder.text_projection"} <= keys
    assert not any("token_embedding" in k for k in keys)
    fresh = benchmark.build("promptsrc", ["x", "y"], clip=copy.deepcopy(tiny_clip))
    benchmark.load_official_checkpoint(fresh, path)
    fresh.set_classnames(NAMES)
    fresh.eval(), trained.eval()
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


def test_harness_checkpoint_repeats_the_frozen_aggregate(tiny_clip, tmp_path):
    from benchmark import checkpoint

    torch.manual_seed(0)
    model = benchmark.build("promptsrc", NAMES, clip=copy.deepcopy(tiny_clip), GPA_MEAN=2, GPA_STD=1)
    for epoch in range(3):
        _perturb(model, 0.1, seed=epoch)
        model.on_epoch_end(epoch, 3)
    model.on_train_end()
    path = checkpoint.save(model, tmp_path / "run.pt")
    fresh = benchmark.build("promptsrc", NAMES, clip=copy.deepcopy(tiny_clip), GPA_MEAN=2, GPA_STD=1)
    checkpoint.load(fresh, path)
    # exact: the prompts come from the file, and loading repeats the aggregate of the frozen weights
    # with the same elementwise operations on the same values (bit identity is the claim)
    for (key, a), b in zip(model.official_tensors().items(), fresh.official_tensors().values()):
        assert torch.equal(a, b), key


# -- configs ---------------------------------------------------------------------------------
def test_official_hyper_parameters_per_protocol():
    b2n = benchmark.make_config("promptsrc", "eurosat", protocol="base2novel")
    o = b2n.TRAINER.PROMPTSRC
    assert (b2n.OPTIM.LR, b2n.OPTIM.MAX_EPOCH, b2n.DATALOADER.TRAIN_X.BATCH_SIZE, b2n.OPTIM.WARMUP_EPOCH) == (0.0025, 20, 4, 1)
    assert (o.N_CTX_TEXT, o.N_CTX_VISION, o.PROMPT_DEPTH_TEXT, o.PROMPT_DEPTH_VISION) == (4, 4, 9, 9)
    assert (o.TEXT_LOSS_WEIGHT, o.IMAGE_LOSS_WEIGHT, o.GPA_MEAN, o.GPA_STD, o.PREC) == (25, 10, 15, 1, "fp16")
    xd = benchmark.make_config("promptsrc", "imagenet", protocol="cross_dataset")
    o = xd.TRAINER.PROMPTSRC
    assert (xd.OPTIM.MAX_EPOCH, o.PROMPT_DEPTH_TEXT, o.PROMPT_DEPTH_VISION, o.GPA_MEAN, o.GPA_STD) == (20, 3, 3, 6, 10)
    fs = benchmark.make_config("promptsrc", "imagenet", protocol="few_shot")
    assert (fs.OPTIM.MAX_EPOCH, fs.TRAINER.PROMPTSRC.GPA_MEAN, fs.TRAINER.PROMPTSRC.GPA_STD) == (50, 30, 30)
    from benchmark.protocols import method_yaml

    # no toy variant: the toy world's schedule rule (tests/test_toy_schedule.py) is the only change
    assert method_yaml("promptsrc", ["base2novel", "eurosat", "toy"]) == method_yaml("promptsrc",
                                                                                    ["base2novel", "eurosat"])
    # the few-shot file's alternative for five datasets, under a "few_shot_<dataset>" variant
    fine = method_yaml("promptsrc", ["few_shot", "few_shot_16", "dtd", "few_shot_dtd"])["TRAINER"]["PROMPTSRC"]
    assert (fine["GPA_MEAN"], fine["GPA_STD"]) == (45, 5)
