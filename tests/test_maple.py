"""MaPLe: prompt layout, coupling and placement against a re-implementation of the official
forward, initialisation, precision layout, parameter counts, checkpoints, class names."""

from __future__ import annotations

import copy
from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale, ops
from torch import nn

import benchmark
import methods.maple  # noqa: F401  (registers "maple")
from benchmark.backbone import tokenize
from benchmark.precision import cast_clip
from methods.registry import MethodError

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]


def _maple(clip, names=NAMES, seed=0, **kw):
    torch.manual_seed(seed)
    return benchmark.build("maple", names, clip=clip, **kw)


def _perturb(model, seed=1, scale=0.05):
    """Move every learned tensor off its initial value (fresh projections are all equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _widths(clip):
    return clip.ln_final.weight.shape[0], clip.visual.conv1.weight.shape[0]


# -- a straightforward re-implementation of the official forward (sequence-first layout) ----------
def _official_block(block, x, mask):
    """CLIP's residual block on (L, N, D) input, written from its weights."""
    h = block.ln_1(x)
    attn = block.attn
    a = F.multi_head_attention_forward(
        h, h, h, h.shape[-1], attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False,
        0.0, attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False, attn_mask=mask)[0]
    x = x + a
    return x + block.mlp(block.ln_2(x))


def _official_transformer(blocks, x, deep, text_layer, n_ctx, mask):
    """The MaPLe blocks: [x, deep prompts, counter] passed from block to block."""
    counter = 0
    for i, block in enumerate(blocks):
        if i != 0 and len(deep) > 0 and not counter > len(deep) - 1:
            ctx = deep[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            if text_layer:
                x = torch.cat([x[:1], ctx, x[1 + n_ctx:]], dim=0)
            else:
                x = torch.cat([x[:x.shape[0] - n_ctx], ctx], dim=0)
            counter += 1
        x = _official_block(block, x, mask)
    return x


def _official_logits(model, clip, names, images):
    learner = model.prompt_learner
    n_ctx = learner.ctx.shape[0]
    # the prompt learner: "a photo of a {name}." with the first n_ctx word embeddings replaced
    tokens = tokenize([f"a photo of a {n.replace('_', ' ')}." for n in names])
    with torch.no_grad():
        embedding = clip.token_embedding(tokens)
    ctx = learner.ctx.unsqueeze(0).expand(len(names), -1, -1)
    prompts = torch.cat([embedding[:, :1], ctx, embedding[:, 1 + n_ctx:]], dim=1)
    shared_ctx = F.linear(learner.ctx, learner.proj.weight, learner.proj.bias)
    deep_text = list(learner.compound_prompts_text)
    deep_vision = [F.linear(p, layer.weight, layer.bias)
                   for p, layer in zip(deep_text, learner.compound_prompt_projections)]
    # the text encoder
    x = (prompts + clip.positional_embedding).permute(1, 0, 2)
    x = _official_transformer(clip.transformer.resblocks, x, deep_text, True, n_ctx, clip.attn_mask)
    x = clip.ln_final(x.permute(1, 0, 2))
    text = x[torch.arange(len(names)), tokens.argmax(dim=-1)] @ clip.text_projection
    # the vision transformer
    v = clip.visual
    x = v.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1) + v.positional_embedding
    x = torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)
    x = _official_transformer(v.transformer.resblocks, x, deep_vision, False, n_ctx, None).permute(1, 0, 2)
    image = v.ln_post(x[:, 0, :]) @ v.proj
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * image @ text.t()


def test_logits_and_gradients_equal_the_official_forward(tiny_clip):
    depth = 9  # the base-to-novel config (the cross-dataset one, 3, runs the same code with fewer prompts)
    model = _maple(tiny_clip, PROMPT_DEPTH=depth)
    _perturb(model)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 2, 1, 1])
    logits = model(images)
    official = _official_logits(model, tiny_clip, NAMES, images)
    assert_close(logits, official, ops=clip_ops(tiny_clip), what="logits")
    params = [p for p in model.prompt_learner.parameters()]
    assert len(params) == 3 + 3 * (depth - 1)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
    want = torch.autograd.grad(F.cross_entropy(official, labels), params)
    for (name, _), got, ref in zip(model.prompt_learner.named_parameters(), grads, want):
        assert got.abs().sum() > 0, name  # every prompt and projection is used
        assert_close(got, ref, ops=clip_ops(tiny_clip, passes=2), what=name)


def test_prompt_layout_only_a_photo_is_learned(tiny_clip):
    """N_CTX 2 with "a photo of a": the 2 vectors start as "a photo"; "of a" stays fixed text."""
    model = _maple(tiny_clip)
    learner = model.prompt_learner
    text = [f"a photo of a {n.replace('_', ' ')}." for n in NAMES]
    assert torch.equal(learner.tokenized_prompts, tokenize(text))
    with torch.no_grad():
        words = tiny_clip.token_embedding(tokenize(["a photo of a"]))[0]
    assert learner.ctx.shape == (2, 64)
    assert torch.equal(learner.ctx, words[1:3])  # "a", "photo"
    assert torch.equal(learner.token_suffix[:, :2], words[3:5].expand(3, -1, -1))  # "of", "a"
    # more than 4 vectors: the official code ignores the init text and draws them
    wide = _maple(tiny_clip, N_CTX=5)
    assert wide.prompt_learner.prefix_text == "X X X X X"
    assert torch.equal(wide.prompt_learner.tokenized_prompts[0], tokenize(["X X X X X golden retriever."])[0])


def test_depth_one_text_side_is_clip_on_the_written_prompt(tiny_clip):
    """J = 1: no deep prompts; at initialisation the text features are CLIP's encoding of
    "a photo of a {class}.", while the image side carries the 2 projected tokens."""
    model = _maple(tiny_clip, PROMPT_DEPTH=1)
    learner = model.prompt_learner
    assert len(learner.compound_prompts_text) == 0 and len(learner.compound_prompt_projections) == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias"}
    with torch.no_grad():
        text = model.encode_text()
        expected = tiny_clip.encode_text(tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
        assert_close(text, expected, ops=clip_ops(tiny_clip))
        images = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(model.encode_image(images), tiny_clip.encode_image(images), atol=1e-3)


def _capture_block_inputs(blocks, index):
    store = []
    handle = blocks[index].register_forward_pre_hook(lambda module, args: store.append(args[0].detach().clone()))
    return store, handle


def test_deep_prompts_overwrite_the_prompt_positions_before_block_1(tiny_clip):
    """Placement: a J = 2 model whose deep prompts equal what a J = 1 model carries at the
    prompt positions entering block 1 (text tokens 1..2, the last 2 image tokens) gives the
    J = 1 logits; other deep prompts change them."""
    names = NAMES[:2]
    shallow = _maple(tiny_clip, names=names, PROMPT_DEPTH=1)
    _perturb(shallow)
    image = torch.randn(1, 3, 32, 32)
    text_in, h1 = _capture_block_inputs(tiny_clip.transformer.resblocks, 1)
    image_in, h2 = _capture_block_inputs(tiny_clip.visual.transformer.resblocks, 1)
    with torch.no_grad():
        reference = shallow(image)
    h1.remove()
    h2.remove()
    text_h = text_in[0][:, 1:3]  # (classes, 2, text width)
    # causal attention: the prompt positions see only SOS and the context, the same for every class
    assert_close(text_h, text_h[:1].expand_as(text_h), ops=clip_ops(tiny_clip))  # rows of one batch
    text_h, image_h = text_h[0], image_in[0][0, -2:]
    assert image_in[0].shape[1] == 1 + 16 + 2  # class token, 4x4 patches, 2 prompt tokens at the end

    deep = _maple(tiny_clip, names=names, PROMPT_DEPTH=2)
    learner = deep.prompt_learner
    with torch.no_grad():
        learner.ctx.copy_(shallow.prompt_learner.ctx)
        learner.proj.load_state_dict(shallow.prompt_learner.proj.state_dict())
        learner.compound_prompts_text[0].copy_(text_h)
        # a projection mapping the two text vectors exactly onto the two image tokens
        weight = image_h.double().t() @ torch.linalg.pinv(text_h.double().t())
        learner.compound_prompt_projections[0].weight.copy_(weight.float())
        learner.compound_prompt_projections[0].bias.zero_()
        # the float32 weight, then a product of length 2 (the errors are relative to its terms)
        terms = (weight.abs() @ text_h.abs().double().t()).max().item()
        assert_close(learner.compound_prompt_projections[0](text_h), image_h, ops=ops(2, depth=2), scale=terms)
        assert_close(deep(image), reference, ops=clip_ops(tiny_clip))
        learner.compound_prompts_text[0].add_(0.5)
        assert not torch.allclose(deep(image), reference, atol=1e-3)


def test_initialisation_follows_the_official_draws(tiny_clip):
    width, image_width = _widths(tiny_clip)
    model = _maple(tiny_clip, seed=5, PROMPT_DEPTH=4)
    learner = model.prompt_learner
    torch.manual_seed(5)
    proj = nn.Linear(width, image_width)  # torch's Linear default
    prompts = [torch.empty(2, width) for _ in range(3)]
    for p in prompts:
        nn.init.normal_(p, std=0.02)
    single = nn.Linear(width, image_width)
    # exact: the same draws from the same seed (the random stream is the claim)
    assert torch.equal(learner.proj.weight, proj.weight) and torch.equal(learner.proj.bias, proj.bias)
    for got, want in zip(learner.compound_prompts_text, prompts):
        assert torch.equal(got, want)
    for layer in learner.compound_prompt_projections:  # deep copies of one layer: all start equal
        assert torch.equal(layer.weight, single.weight) and torch.equal(layer.bias, single.bias)
    # no init text: the context is drawn first, N(0, 0.02^2)
    model = _maple(tiny_clip, seed=6, CTX_INIT="", PROMPT_DEPTH=2)
    torch.manual_seed(6)
    ctx = torch.empty(2, width)
    nn.init.normal_(ctx, std=0.02)
    assert torch.equal(model.prompt_learner.ctx, ctx)
    assert torch.equal(model.prompt_learner.tokenized_prompts[1], tokenize(["X X tabby cat."])[0])
    big = _maple(tiny_clip, PROMPT_DEPTH=12)  # enough draws to see the standard deviation
    values = torch.cat([p.flatten() for p in big.prompt_learner.compound_prompts_text])
    assert values.std().item() == pytest.approx(0.02, rel=0.1)


def test_fp16_layout_half_context_and_proj_fp32_deep_prompts(tiny_clip):
    model = _maple(cast_clip(tiny_clip, "fp16"))
    learner = model.prompt_learner
    assert learner.ctx.dtype == learner.proj.weight.dtype == learner.token_prefix.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in learner.compound_prompts_text)
    assert all(p.dtype == torch.float32 for p in learner.compound_prompt_projections.parameters())
    with torch.no_grad():
        prompts, shared, deep_text, deep_vision = learner()
    assert prompts.dtype == shared.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in deep_text + deep_vision)


def _learned_count(n_ctx, width, image_width, depth):
    per_layer = n_ctx * width + width * image_width + image_width  # a prompt and its projection
    return per_layer * depth  # the input layer: ctx and proj


def test_trainable_parameter_counts(tiny_clip):
    model = _maple(tiny_clip)
    width, image_width = _widths(tiny_clip)
    n = sum(p.numel() for p in model.trainable_parameters())
    assert n == _learned_count(2, width, image_width, 9) == 9 * (128 + 64 * 128 + 128)
    # ViT-B/16 (random weights on the meta device: only shapes matter): the published ~3.55M
    with torch.device("meta"):
        vit = open_clip.create_model("ViT-B-16", device="meta")
        b16 = benchmark.build("maple", ["cat"], clip=vit, device="meta")
        b16_xd = benchmark.build("maple", ["cat"], clip=vit, device="meta", PROMPT_DEPTH=3)
    assert sum(p.numel() for p in b16.trainable_parameters()) == _learned_count(2, 512, 768, 9) == 3_555_072
    assert sum(p.numel() for p in b16_xd.trainable_parameters()) == _learned_count(2, 512, 768, 3) == 1_185_024


def test_official_hyper_parameters():
    from benchmark.protocols import config_variants, method_yaml

    b2n = method_yaml("maple", config_variants("base2novel", "imagenet", 16, "real"))
    assert b2n["OPTIM"]["LR"] == 0.0035 and b2n["OPTIM"]["MAX_EPOCH"] == 5
    assert b2n["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"] == 4
    assert b2n["TRAINER"]["MAPLE"] == {"N_CTX": 2, "CTX_INIT": "a photo of a", "PREC": "fp16", "PROMPT_DEPTH": 9}
    xd = method_yaml("maple", config_variants("transfer", "imagenet", 16, "real"))
    assert xd["OPTIM"]["LR"] == 0.0026 and xd["OPTIM"]["MAX_EPOCH"] == 2
    assert xd["TRAINER"]["MAPLE"]["PROMPT_DEPTH"] == 3 and xd["OPTIM"]["WARMUP_EPOCH"] == 1


def _official_file(path, model, clip):
    """A checkpoint laid out as the official trainer writes it: the whole model's state dict."""
    state = OrderedDict((f"prompt_learner.{k}", v) for k, v in model.prompt_learner.state_dict().items()
                        if k != "tokenized_prompts")  # an attribute, not a buffer, in the official model
    state.update((f"image_encoder.{k}", v) for k, v in clip.visual.state_dict().items())
    state.update((f"text_encoder.transformer.{k}", v) for k, v in clip.transformer.state_dict().items())
    state["text_encoder.positional_embedding"] = clip.positional_embedding.detach()
    state.update((f"text_encoder.ln_final.{k}", v) for k, v in clip.ln_final.state_dict().items())
    state["text_encoder.text_projection"] = clip.text_projection.detach()
    state["logit_scale"] = clip.logit_scale.detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 5, "optimizer": None, "scheduler": None, "val_result": None}, path)
    return set(state)


def test_official_checkpoint_loads_learned_keys_only(tiny_clip, tmp_path):
    trained = _maple(tiny_clip, seed=1)
    _perturb(trained)
    path = tmp_path / "MultiModalPromptLearner" / "model.pth.tar-5"
    keys = _official_file(path, trained, tiny_clip)
    assert {"prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.compound_prompts_text.7",
            "prompt_learner.compound_prompt_projections.7.bias", "prompt_learner.token_prefix",
            "image_encoder.conv1.weight", "text_encoder.transformer.resblocks.11.attn.in_proj_weight",
            "logit_scale"} <= keys
    fresh = _maple(copy.deepcopy(tiny_clip), names=["fox", "wolf"], seed=2)  # other classes: other buffers
    assert benchmark.load_official_checkpoint(fresh, path)["epoch"] == 5
    for (name, got), want in zip(fresh.prompt_learner.named_parameters(), trained.prompt_learner.parameters()):
        assert torch.equal(got, want), name
    fresh.set_classnames(NAMES)
    images = torch.randn(2, 3, 32, 32)
    restored = dict(ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
    assert_restored(fresh, trained, images, **restored)
    # our own files: the learned module under the official names
    ours = benchmark.save_official_checkpoint(trained, tmp_path / "ours" / "model.pth.tar-5", 5)
    saved = set(torch.load(ours, weights_only=True)["state_dict"])
    assert saved == {k for k in keys if k.startswith("prompt_learner.")}
    other = _maple(copy.deepcopy(tiny_clip), seed=3)
    benchmark.load_official_checkpoint(other, ours)
    assert_restored(other, trained, images, **restored)
    # a checkpoint of another depth does not fit
    shallow = _maple(copy.deepcopy(tiny_clip), PROMPT_DEPTH=3)
    with pytest.raises(MethodError, match="unexpected keys.*compound_prompt"):
        benchmark.load_official_checkpoint(shallow, path)


def test_set_classnames_for_novel_classes_and_the_text_cache(tiny_clip):
    novel = ["red fox", "sea_lion"]
    model = _maple(tiny_clip)
    _perturb(model)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert model(images).shape == (3, 3)  # caches the base classes' text features
        model.set_classnames(novel)
        got = model(images)
    direct = _maple(copy.deepcopy(tiny_clip), names=novel, seed=4)
    learned = {k: v for k, v in model.prompt_learner.state_dict().items() if not k.startswith("token")}
    direct.prompt_learner.load_state_dict(learned, strict=False)
    with torch.no_grad():
        assert_close(got, direct(images), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
    # an in-place update of the weights (an optimiser step) refreshes the cached text features
    with torch.no_grad():
        model.prompt_learner.compound_prompts_text[0].add_(0.3)
        cached = model(images)
    assert_close(cached, model(images).detach(), ops=clip_ops(tiny_clip))  # with and without autograd
    assert not torch.allclose(cached, got, atol=1e-3)


def test_rejects_depths_beyond_the_backbone(tiny_clip):
    with pytest.raises(ValueError, match="PROMPT_DEPTH"):
        _maple(tiny_clip, PROMPT_DEPTH=13)
    with pytest.raises(ValueError, match="PROMPT_DEPTH"):
        _maple(tiny_clip, PROMPT_DEPTH=0)


def test_harness_checkpoint_restores_prompts_and_class_names(tiny_clip, tmp_path):
    from benchmark import checkpoint

    trained = _maple(tiny_clip, seed=1)
    _perturb(trained)
    path = checkpoint.save(trained, tmp_path / "maple.pt")
    fresh = _maple(copy.deepcopy(tiny_clip), names=["fox", "wolf"], seed=2)
    checkpoint.load(fresh, path)
    assert fresh.classnames == NAMES
    assert torch.equal(fresh.prompt_learner.tokenized_prompts, trained.prompt_learner.tokenized_prompts)
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
