"""MMA's ablation switches: the defaults are the official computation bit for bit, and
each switch (no shared projection, one tower only, other layers, width and alpha) computes
the equations of an independent re-implementation, logits and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale

import benchmark
from benchmark import protocols
from benchmark.backbone import tokenize

NAMES = ["golden_retriever", "tabby cat", "red fox", "sea lion"]
DEFAULTS = dict(SHARED=True, TOWERS="both", ADAPTER_START=5, ADAPTER_END=12, ADAPTER_DIM=32, ADAPTER_SCALE=0.001)


def _mma(clip, **kw):
    torch.manual_seed(0)
    return benchmark.build("mma", NAMES, clip=copy.deepcopy(clip), **kw)


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_learner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _step(model, images, labels):
    """Logits and the adapters' gradients of one training step."""
    model.train()
    model.zero_grad()
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.adapter_learner.named_parameters()}


def test_defaults_are_bit_identical_with_and_without_the_new_keys(tiny_clip):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3, 1])
    plain, explicit = _mma(tiny_clip), _mma(tiny_clip, **DEFAULTS)
    for model in (plain, explicit):
        _perturb(model)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    logits_a, grads_a = _step(plain, images, labels)
    logits_b, grads_b = _step(explicit, images, labels)
    # exact: bit identity is the claim, and both models run the same operations on the same inputs
    assert torch.equal(logits_a, logits_b)
    assert list(grads_a) == list(grads_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # the initial weights too (the same random draws, in the official order)
    fresh_a, fresh_b = _mma(tiny_clip), _mma(tiny_clip, **DEFAULTS)
    for (name, a), (_, b) in zip(fresh_a.adapter_learner.named_parameters(), fresh_b.adapter_learner.named_parameters()):
        assert torch.equal(a, b), name


def test_new_keys_at_their_defaults_leave_run_identities_unchanged():
    spec = protocols.expand("base2novel", methods=["mma"], datasets=["eurosat"], seeds=[1], root="unused",
                            backbone="tiny-clip-12", backbone_id="tiny")[0]
    before = copy.deepcopy(spec)  # as a record made before the switches existed: no such keys
    for key in ("SHARED", "TOWERS"):
        del before.config["TRAINER"]["MMADAPTER"][key]
    assert spec.config["TRAINER"]["MMADAPTER"]["SHARED"] is True
    assert protocols.run_identity(spec) == protocols.run_identity(before)
    off = protocols.expand("base2novel", methods=["mma"], datasets=["eurosat"], seeds=[1], root="unused",
                           backbone="tiny-clip-12", backbone_id="tiny", opts=["TRAINER.MMADAPTER.SHARED", "False"])[0]
    assert off.run_id != spec.run_id


# -- an independent reference of the equations, with every switch -----------------------------
def _adapter(x, down, up, shared, scale):
    h = F.relu(F.linear(x, down.weight, down.bias))
    if shared is not None:
        h = F.relu(F.linear(h, shared.weight, shared.bias))
    return scale * F.linear(h, up.weight, up.bias)


def _weights(learner, tower, i):
    """(down, up, shared) Linear layers of layer i, or None when that layer has no adapter."""
    table = learner.text_adapter if tower == "text" else learner.visual_adapter
    if table[i] is None:
        return None
    shared = learner.shared_adapter[i][0] if learner.shared_adapter is not None else None
    return table[i].down[0], table[i].up, shared


def _reference_logits(clip, learner, images, opts):
    """x_i = Block_i(x_{i-1}) + alpha * up([ReLU(S)] ReLU(down(ln_1^i(x_{i-1})))) for i in start..end
    of the towers chosen; index 0 adapts the stem's output (image: after ln_pre; text: the
    token embeddings); a tower without adapters is CLIP's own."""
    start, end, scale = opts["ADAPTER_START"], opts["ADAPTER_END"], opts["ADAPTER_SCALE"]
    towers = {"both": ("text", "image"), "text": ("text",), "image": ("image",)}[opts["TOWERS"]]
    layers = range(start, end + 1)

    def extra(tower, i, x):
        w = _weights(learner, tower, i) if i in layers and tower in towers else None
        assert (w is not None) == (i in layers and tower in towers)  # the model's placement agrees
        return 0 if w is None else _adapter(x, *w, scale)

    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    x = x + extra("image", 0, x)
    for i, block in enumerate(v.transformer.resblocks, 1):
        x = block(x) + extra("image", i, block.ln_1(x))
    img = v.ln_post(x[:, 0]) @ v.proj

    tokens = tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    t = clip.token_embedding(tokens)
    t = t + extra("text", 0, t) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks, 1):
        t = block(t, attn_mask=clip.attn_mask) + extra("text", i, block.ln_1(t))
    t = clip.ln_final(t)[torch.arange(len(NAMES)), tokens.argmax(-1)] @ clip.text_projection
    return clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(t, dim=-1).t()


SWITCHES = [
    dict(SHARED=False),
    dict(TOWERS="text"),
    dict(TOWERS="image"),
    dict(TOWERS="image", SHARED=False),
    dict(ADAPTER_START=3, ADAPTER_END=9, ADAPTER_DIM=16, ADAPTER_SCALE=0.01),
    dict(ADAPTER_START=0, ADAPTER_END=2, TOWERS="text", ADAPTER_SCALE=0.1),
]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_switch_against_the_reference(tiny_clip, switch):
    opts = {**DEFAULTS, **switch}
    # both sides in float64, so that a tight bound is honest
    model = _mma(tiny_clip, **switch).double()
    _perturb(model)
    learner = model.adapter_learner
    if not opts["SHARED"]:
        assert learner.shared_adapter is None
        assert not any(k.startswith("shared_adapter") for k in learner.state_dict())
    if opts["TOWERS"] != "both":
        off = learner.visual_adapter if opts["TOWERS"] == "text" else learner.text_adapter
        assert all(a is None for a in off)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    labels = torch.tensor([0, 3, 1])
    img_a = images.clone().requires_grad_(True)
    model.train()
    F.cross_entropy(model(img_a), labels).backward()
    ours = {n: p.grad.clone() for n, p in learner.named_parameters()}

    ref = copy.deepcopy(learner)
    ref.zero_grad()
    img_b = images.clone().requires_grad_(True)
    ref_logits = _reference_logits(model.clip, ref, img_b, opts)
    F.cross_entropy(ref_logits, labels).backward()

    forward, backward = clip_ops(model.clip), clip_ops(model.clip, passes=2)
    with torch.no_grad():
        model.eval()
        assert_close(model(images), ref_logits, ops=forward, what="logits")
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        # in blocks: 1/alpha times the true gradient (the gradient-scaling ops); index 0 has none
        factor = 1.0 if name.split(".")[1] == "0" else 1 / opts["ADAPTER_SCALE"]
        assert_close(ours[name], p.grad * factor, ops=backward, what=name)
    assert_close(img_a.grad, img_b.grad, ops=backward, what="image gradient")


def test_bad_towers_value_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="TOWERS is 'vision'.*both"):
        _mma(tiny_clip, TOWERS="vision")


def test_official_checkpoint_with_defaults_and_without_shared(tiny_clip, tmp_path):
    trained = _mma(tiny_clip)
    _perturb(trained, seed=7)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "default" / "model.pth.tar-5", 5)
    fresh = _mma(tiny_clip)
    benchmark.load_official_checkpoint(fresh, path)
    images = torch.randn(2, 3, 32, 32)
    trained.eval(), fresh.eval()
    restored = dict(ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))
    assert_restored(fresh, trained, images, **restored)
    # without the shared projection: its own checkpoints load, the default model's are refused
    lean = _mma(tiny_clip, SHARED=False)
    _perturb(lean, seed=8)
    lean_path = benchmark.save_official_checkpoint(lean, tmp_path / "lean" / "model.pth.tar-5", 5)
    assert not any(k.startswith("shared_adapter") for k in torch.load(lean_path, weights_only=True)["state_dict"])
    again = _mma(tiny_clip, SHARED=False)
    benchmark.load_official_checkpoint(again, lean_path)
    lean.eval(), again.eval()
    assert_restored(again, lean, images, **restored)
    with pytest.raises(ValueError, match="shared_adapter"):
        benchmark.load_official_checkpoint(_mma(tiny_clip), lean_path)
