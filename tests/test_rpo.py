"""RPO: the read-only masks, prompt placement, ensemble logits and gradients against a plain
re-implementation of the official forward (one class at a time, sequence-first, explicit
masks, several attention heads), CLIP's own tokens untouched, initialisation, precision,
class names, checkpoints, per-protocol configs, learning in the toy world and a run through
the command line."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale, ops

import benchmark
import methods.rpo  # noqa: F401  (registers the method)
from benchmark.backbone import tokenize
from benchmark.precision import cast_clip
from methods.registry import MethodError

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
INF = float("-inf")


def _rpo(clip, names=NAMES, seed=0, **kw):
    torch.manual_seed(seed)
    return benchmark.build("rpo", names, clip=clip, **kw)


def _perturb(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


@pytest.fixture
def heads_clip():
    """A small CLIP with several attention heads in both towers (4 text, 2 image), so that
    the per-class, per-head layout of the text mask is tested."""
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=3, width=64, head_width=32, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3)).eval()


# -- the official forward, written out --------------------------------------------------------------
def _official_block(block, x, mask):
    """CLIP's residual block on (L, N, D) input, with an additive mask."""
    h = block.ln_1(x)
    attn = block.attn
    a = F.multi_head_attention_forward(
        h, h, h, h.shape[-1], attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False,
        0.0, attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False, attn_mask=mask)[0]
    x = x + a
    return x + block.mlp(block.ln_2(x))


def _official_text(clip, text_prompt, names):
    """One class at a time: "a photo of a <name>." (name as given), embeddings + positions, the K
    prompts written after EOT without positions, a causal mask with every key after EOT hidden;
    the features at the K prompt positions."""
    k = text_prompt.shape[0]
    features = []
    for name in names:
        tokens = tokenize([f"a photo of a {name}."])
        e = int(tokens.argmax())
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = torch.cat([x[:, :e + 1], text_prompt.unsqueeze(0), x[:, e + 1 + k:]], dim=1)
        mask = torch.full((77, 77), INF).triu(1)
        mask[:, e + 1:] = INF
        h = x.permute(1, 0, 2)
        for block in clip.transformer.resblocks:
            h = _official_block(block, h, mask)
        h = clip.ln_final(h.permute(1, 0, 2))
        features.append(h[0, e + 1:e + 1 + k] @ clip.text_projection)
    return torch.stack(features)  # (classes, K, embed)


def _official_image(clip, images, img_prompt):
    """Patches + CLS + positions, the K prompts appended without positions, ln_pre, a mask hiding
    the prompt keys from every query; ln_post of the prompt tokens."""
    v, k = clip.visual, img_prompt.shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(images), 1, -1), x], dim=1) + v.positional_embedding
    x = torch.cat([x, img_prompt.expand(len(images), -1, -1)], dim=1)
    x = v.ln_pre(x)
    mask = torch.zeros(x.shape[1], x.shape[1])
    mask[:, -k:] = INF
    h = x.permute(1, 0, 2)
    for block in v.transformer.resblocks:
        h = _official_block(block, h, mask)
    return v.ln_post(h.permute(1, 0, 2)[:, -k:]) @ v.proj  # (images, K, embed)


def _official_logits(model, clip, images, names=NAMES):
    pl = model.prompt_learner
    text = F.normalize(_official_text(clip, pl.text_prompt, names), dim=-1)
    image = F.normalize(_official_image(clip, images, pl.img_prompt), dim=-1)
    # the mean over the K pairs of the pair's cosine logits
    return clip.logit_scale.exp() * torch.einsum("bkd,nkd->bn", image, text) / pl.K


# -- configuration and initialisation -------------------------------------------------------------
def test_official_hyper_parameters_per_protocol():
    b2n = benchmark.make_config("rpo", "eurosat", protocol="base2novel")
    assert (b2n.TRAINER.RPO.K, b2n.TRAINER.RPO.PREC) == (24, "fp16")
    assert (b2n.OPTIM.LR, b2n.OPTIM.MAX_EPOCH, b2n.DATALOADER.TRAIN_X.BATCH_SIZE, b2n.OPTIM.WARMUP_EPOCH,
            b2n.OPTIM.WARMUP_CONS_LR, b2n.OPTIM.LR_SCHEDULER) == (0.01, 15, 4, 1, 1e-5, "cosine")
    assert benchmark.make_config("rpo", "imagenet", protocol="base2novel").OPTIM.LR == 0.01  # main_K24 for all 11
    xd = benchmark.make_config("rpo", "imagenet", protocol="transfer")
    assert (xd.OPTIM.LR, xd.OPTIM.MAX_EPOCH, xd.TRAINER.RPO.K) == (0.005, 15, 24)  # imagenet_k24_ep15


def test_initialisation(tiny_clip):
    """Text prompts: the EOT token's embedding plus 0.1 times a unit Gaussian direction each;
    image prompts: the class embedding plus the same; text noise drawn first."""
    model = _rpo(tiny_clip, seed=7, K=5)
    pl = model.prompt_learner
    torch.manual_seed(7)
    text_noise, image_noise = torch.randn(5, 64), torch.randn(5, 128)
    eot = tiny_clip.token_embedding.weight[49407]
    init = ops(128, depth=3)  # a norm over a row, a division, the sum
    with torch.no_grad():
        assert_close(pl.text_prompt, eot.repeat(5, 1) + 0.1 * (text_noise / text_noise.norm(dim=-1, keepdim=True)),
                     ops=init)
        cls = tiny_clip.visual.class_embedding
        assert_close(pl.img_prompt, cls.repeat(5, 1) + 0.1 * (image_noise / image_noise.norm(dim=-1, keepdim=True)),
                     ops=init)
    assert torch.allclose((pl.text_prompt - eot).norm(dim=-1), torch.full((5,), 0.1))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_learner.text_prompt",
                                                                          "prompt_learner.img_prompt"}
    assert sum(p.numel() for p in model.trainable_parameters()) == 5 * (64 + 128)
    with pytest.raises(MethodError, match="K"):
        _rpo(copy.deepcopy(tiny_clip), K=0)


# -- the forward against the official computation -------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 24])
def test_logits_and_gradients_equal_the_official_forward(heads_clip, k):
    model = _rpo(heads_clip, K=k)
    _perturb(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1, 1])
    model.train()
    logits = model(images)
    official = _official_logits(model, heads_clip, images)
    assert_close(logits, official, ops=clip_ops(heads_clip), what="logits")
    params = list(model.prompt_learner.parameters())
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
    want = torch.autograd.grad(F.cross_entropy(official, labels), params)
    for (name, _), got, ref in zip(model.prompt_learner.named_parameters(), grads, want):
        assert got.abs().sum() > 0, name
        assert_close(got, ref, ops=clip_ops(heads_clip, passes=2), what=name)
    with torch.no_grad():  # evaluation: the same ensemble, text features cached
        assert_close(model.eval()(images), official.detach(), ops=clip_ops(heads_clip), what="evaluation logits")


def test_clip_tokens_are_read_only(heads_clip):
    """With the prompts far from their start, CLIP's own tokens come out of every block as in
    CLIP without prompts (text up to EOT under the causal mask, every image token), and each
    prompt pair is independent of the others."""
    model = _rpo(heads_clip, K=4)
    _perturb(model, scale=3.0)
    images = torch.randn(2, 3, 32, 32)
    seen = []
    hooks = [heads_clip.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: seen.append(o)),
             heads_clip.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))]
    with torch.no_grad():
        model.train()
        text, image = model.encode_text(), model.encode_image(images)
        prompted_text, prompted_image = seen[0], seen[1]
        heads_clip.encode_text(model.tokens)
        heads_clip.encode_image(images)
        plain_text, plain_image = seen[2], seen[3]
    for h in hooks:
        h.remove()
    eot = model.tokens.argmax(dim=-1)
    for c in range(len(NAMES)):
        e = int(eot[c])
        assert_close(prompted_text[c, :e + 1], plain_text[c, :e + 1], ops=clip_ops(heads_clip), what="text tokens")
    assert_close(prompted_image[:, :plain_image.shape[1]], plain_image, ops=clip_ops(heads_clip), what="image tokens")
    # moving pair 1 leaves the features of pairs 0, 2, 3 where they were
    with torch.no_grad():
        # (a random direction: a constant shift would vanish in the layer norms)
        model.prompt_learner.text_prompt[1] += torch.randn(64)
        model.prompt_learner.img_prompt[1] += torch.randn(64)
        text2, image2 = model.encode_text(), model.encode_image(images)
    keep = [0, 2, 3]
    assert_close(text2[:, keep], text[:, keep], ops=clip_ops(heads_clip))
    assert_close(image2[:, keep], image[:, keep], ops=clip_ops(heads_clip))
    assert not torch.allclose(text2[:, 1], text[:, 1], atol=1e-3) and not torch.allclose(image2[:, 1], image[:, 1], atol=1e-3)


def test_truncated_text_pass_gives_the_same_logits_and_gradients(tiny_clip):
    names = ["ox", "a rather long class name made of many separate words", "tabby cat"]
    results = []
    for on in (False, True):
        model = _rpo(copy.deepcopy(tiny_clip), names=names, K=6, **{"SPEED.TRUNCATE_TEXT": on})
        _perturb(model)
        model.train()
        seen: list[int] = []
        hook = model.clip.transformer.resblocks[0].register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(o.shape[1]))
        logits = model(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        hook.remove()
        F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
        results.append((seen[0], logits.detach(), [p.grad for p in model.prompt_learner.parameters()]))
    longest = int(model.tokens.argmax(dim=-1).max()) + 1
    assert results[0][0] == 77 and results[1][0] == longest + 6
    assert_close(results[1][1], results[0][1], ops=clip_ops(tiny_clip))
    for fast, plain in zip(results[1][2], results[0][2]):
        assert_close(fast, plain, ops=clip_ops(tiny_clip, passes=2))


def test_half_precision_layout(tiny_clip):
    """fp16 (the official configs): CLIP and both prompts in half precision; the ensemble
    logits accumulated in fp32; the gradients half."""
    model = _rpo(cast_clip(tiny_clip, "fp16"), K=3)
    pl = model.prompt_learner
    assert pl.text_prompt.dtype == torch.float16 and pl.img_prompt.dtype == torch.float16
    assert model.text_x.dtype == torch.float16
    model.train()
    logits = model(torch.randn(2, 3, 32, 32).half())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert pl.text_prompt.grad.dtype == torch.float16 and pl.img_prompt.grad.dtype == torch.float16


# -- class names and checkpoints -------------------------------------------------------------------
def test_class_names_keep_underscores_and_must_leave_room(tiny_clip):
    model = _rpo(tiny_clip)
    assert torch.equal(model.tokens, tokenize([f"a photo of a {n}." for n in NAMES]))  # "golden_retriever" as given
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model(images)  # fills the evaluation cache of the old classes
        model.set_classnames(["fox", "red_wolf"])
        assert_close(model(images), _official_logits(model, tiny_clip, images, ["fox", "red_wolf"]),
                     ops=clip_ops(tiny_clip))
    with pytest.raises(MethodError, match="room"):
        model.set_classnames([" ".join(["word"] * 50)])  # 24 prompts no longer fit after its EOT
    assert model.classnames == ["fox", "red_wolf"]


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = _rpo(tiny_clip)
    _perturb(trained)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "prompt_learner" / "model.pth.tar-15", 15)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == {"text_prompt", "img_prompt"}
    fresh = _rpo(copy.deepcopy(tiny_clip), names=["x", "y"], seed=3)
    assert benchmark.load_official_checkpoint(fresh, path)["epoch"] == 15
    fresh.set_classnames(NAMES)
    fresh.eval(), trained.eval()
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
    other = _rpo(copy.deepcopy(tiny_clip), K=4)
    with pytest.raises(MethodError, match="shape mismatch"):
        benchmark.load_official_checkpoint(other, path)


# -- learning and the command line ------------------------------------------------------------------
def _cli_records(root, out, methods, dataset, *opts):
    from benchmark import cli, store

    args = ["run", "--methods", methods, "--datasets", dataset, "--seeds", "1", "--output", str(out), "-q"]
    args += ["--root", str(root)] if root else ["--world", "synthetic"]
    assert cli.main(args + (["--opts", *opts] if opts else [])) == 0
    return {r["method"]: r for r in store.iter_records(out)}


@pytest.mark.slow
def test_learns_in_the_toy_world(tmp_path):
    """The shipped toy CLIP on the eurosat slot (inverted-colour scenes, weak zero-shot): the
    loss falls and the base classes beat zero-shot CLIP."""
    from datasets.toy import write_toy_root

    root = write_toy_root(tmp_path / "toy", ["eurosat"], sizes={"train": 16, "val": 2, "test": 12})
    zs = _cli_records(root, tmp_path / "zs", "zsclip", "eurosat")["zsclip"]
    run = _cli_records(root, tmp_path / "rpo", "rpo", "eurosat", "OPTIM.MAX_EPOCH", "4")["rpo"]
    losses = run["train"]["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert run["metrics"]["base"]["accuracy"] >= zs["metrics"]["base"]["accuracy"] + 5, (run["metrics"], zs["metrics"])


@pytest.mark.slow
def test_runs_end_to_end_on_the_command_line(tmp_path):
    run = _cli_records(None, tmp_path / "out", "rpo", "eurosat", "OPTIM.MAX_EPOCH", "1",
                       "DATALOADER.NUM_WORKERS", "0")["rpo"]
    assert run["status"] == "ok" and set(run["metrics"]) == {"base", "novel"}
    assert run["train"]["steps"] > 0 and run["compute"]["trainable_params"] == 24 * (64 + 128)
    assert run["config"]["TRAINER"]["RPO"]["K"] == 24
