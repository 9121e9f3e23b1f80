"""ProGrad: the context initialisation from the dataset's template, the zero-shot teacher, both
losses, the projected gradient against a literal re-implementation of the official step
(two backward passes, then the projection), precision layout, class names, checkpoints,
per-protocol configs, learning in the toy world and a run through the command line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale, ops

import benchmark
import methods.prograd  # noqa: F401  (registers the method)
from benchmark.backbone import tokenize
from benchmark.models import dataset_context
from benchmark.precision import cast_clip
from benchmark.trainer import optimizer_step
from methods.prograd import TEMPLATES, project
from methods.registry import MethodError, build_method

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
PETS = "a type of pet, a photo of a {}."


def _prograd(clip, names=NAMES, dataset="oxford_pets", seed=0, **kw):
    torch.manual_seed(seed)
    return benchmark.build("prograd", names, clip=clip, dataset=dataset, **kw)


def _perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ctx = model.prompt_learner.ctx
        ctx.add_((scale * torch.randn(ctx.shape, generator=g)).to(ctx.dtype))


# -- a re-implementation of the official computation ------------------------------------------------
def _text(clip, embeddings, tokens):
    x = clip.transformer(embeddings + clip.positional_embedding, attn_mask=clip.attn_mask)
    return clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip.text_projection


def _written(template, n_ctx=16):
    """The official written context: M - w placeholders "X", then the template's words."""
    words = template.replace(" {}.", "")
    return " ".join(["X"] * (n_ctx - len(words.split(" ")))) + " " + words


def _student_logits(clip, ctx, template, names, images):
    """The official prompt learner and CustomCLIP: positions 1..M of "<written context> <name>."
    replaced by the context."""
    tokens = tokenize([f"{_written(template, ctx.shape[0])} {n.replace('_', ' ')}." for n in names])
    emb = clip.token_embedding(tokens)
    x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), emb[:, 1 + ctx.shape[0]:]], dim=1)
    text = F.normalize(_text(clip, x, tokens), dim=-1)
    image = F.normalize(clip.encode_image(images), dim=-1)
    return clip.logit_scale.exp() * image @ text.t()


def _teacher_logits(clip, template, names, images):
    """The official zero-shot CLIP: the ProGrad template, "_" read as a space."""
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokenize([template.format(n.replace("_", " ")) for n in names])), dim=-1)
        image = F.normalize(clip.encode_image(images), dim=-1)
        return clip.logit_scale.exp() * image @ text.t()


def _official_step_gradient(clip, ctx0, template, names, images, labels, lam=1.0, T=1.0):
    """Dassl.ProGrad's prograd_backward_and_update on a fresh leaf: backward the KL (keeping
    the graph), keep its gradient, zero, backward the cross-entropy, project where they conflict."""
    ctx = ctx0.detach().clone().requires_grad_(True)
    logits = _student_logits(clip, ctx, template, names, images)
    teacher = _teacher_logits(clip, template, names, images)
    xe = F.cross_entropy(logits, labels)
    kl = F.cross_entropy(logits / T, F.softmax(teacher / T, dim=-1)) * T * T  # soft-target cross-entropy
    kl.backward(retain_graph=True)
    b = ctx.grad.clone()
    ctx.grad = None
    xe.backward()
    a = ctx.grad.clone()
    b_unit, a_unit = b / b.norm(), a / a.norm()
    conflict = bool((a_unit * b_unit).sum() < 0)
    return (a - lam * (a * b_unit).sum() * b_unit if conflict else a), conflict, xe.detach(), kl.detach()


# -- configuration and initialisation -------------------------------------------------------------
def test_official_hyper_parameters_per_protocol():
    b2n = benchmark.make_config("prograd", "eurosat", protocol="base2novel")
    o = b2n.TRAINER.PROGRAD
    assert (o.N_CTX, o.CSC, o.CTX_INIT, o.CLASS_TOKEN_POSITION, o.PREC, o.T, o.LAMBDA) == (16, False, True, "end", "fp16", 1.0, 1.0)
    assert (b2n.OPTIM.LR, b2n.OPTIM.MAX_EPOCH, b2n.DATALOADER.TRAIN_X.BATCH_SIZE, b2n.OPTIM.WARMUP_EPOCH,
            b2n.OPTIM.WARMUP_CONS_LR) == (0.002, 100, 32, 1, 1e-5)
    assert benchmark.make_config("prograd", "imagenet", protocol="base2novel").OPTIM.MAX_EPOCH == 50
    epochs = {k: benchmark.make_config("prograd", "caltech101", protocol="few_shot", shots=k).OPTIM.MAX_EPOCH
              for k in (1, 2, 4, 8, 16)}
    assert epochs == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    # lambda 0.8 at 8 and 16 shots on Flowers102, DTD and EuroSAT (the official README), 1.0 elsewhere
    clip = benchmark.load_clip("tiny-clip-1")
    for dataset, shots, lam in [("dtd", 16, 0.8), ("oxford_flowers", 8, 0.8), ("eurosat", 4, 1.0), ("caltech101", 16, 1.0)]:
        cfg = benchmark.make_config("prograd", dataset, protocol="few_shot", shots=shots)
        cfg.freeze()
        names = ["a", "b"]
        model = build_method("prograd", clip, names, cfg, dataset=dataset_context(dataset, names, shots=shots))
        assert model.lam == lam, (dataset, shots)
    assert benchmark.make_config("prograd", "dtd", protocol="base2novel").TRAINER.PROGRAD.LAMBDA_BY_SHOTS == []


def test_context_starts_from_the_dataset_template(tiny_clip):
    """M = 16: the first 16 - w vectors are zeros, the last w the template's first w tokens (w =
    its number of words). With "pet," (two tokens) the last template word stays fixed text."""
    model = _prograd(tiny_clip)
    learner = model.prompt_learner
    words = "a type of pet, a photo of a"
    assert learner.prefix_text == " ".join(["X"] * 8) + " " + words
    emb = tiny_clip.token_embedding(tokenize([words]))[0]
    assert torch.equal(learner.ctx[:8], torch.zeros(8, 64)) and torch.equal(learner.ctx[8:], emb[1:9])
    # the initial prompt is the written sentence with its eight placeholders as zero vectors
    tokens = tokenize([f"{learner.prefix_text} {n.replace('_', ' ')}." for n in NAMES])
    x = tiny_clip.token_embedding(tokens)
    x[:, 1:9] = 0
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_clip.logit_scale.exp() * F.normalize(tiny_clip.encode_image(images), dim=-1) @ \
            F.normalize(_text(tiny_clip, x, tokens), dim=-1).t()
        assert_close(model.eval()(images), expected, ops=clip_ops(tiny_clip))
    # four words, four tokens: the whole template is context
    dtd = _prograd(copy.deepcopy(tiny_clip), dataset="dtd")
    assert dtd.prompt_learner.prefix_text.endswith("X a texture of") and dtd.template == "a texture of {}."
    # a switch: without it, N(0, 0.02^2)
    rand = _prograd(copy.deepcopy(tiny_clip), CTX_INIT=False)
    assert rand.prompt_learner.prefix_text == " ".join(["X"] * 16)
    assert rand.prompt_learner.ctx.std().item() == pytest.approx(0.02, rel=0.15)
    with pytest.raises(MethodError, match="N_CTX"):
        _prograd(copy.deepcopy(tiny_clip), N_CTX=4)  # eight words do not fit in four vectors
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_learner.ctx"}


def test_templates_are_the_official_table():
    assert TEMPLATES["oxford_pets"] == PETS and TEMPLATES["eurosat"] == "a centered satellite photo of {}."
    assert TEMPLATES["food101"] == "a type of food, a photo of {}." and TEMPLATES["ucf101"] == "a photo of a person doing {}."
    assert {TEMPLATES[n] for n in ("imagenet", "imagenet_a", "imagenet_r", "imagenetv2", "imagenet_sketch", "sun397",
                                   "caltech101", "stanford_cars")} == {"a photo of a {}."}
    assert len(TEMPLATES) == 15


# -- teacher, losses and the projected gradient -------------------------------------------------------
def test_teacher_and_losses(tiny_clip):
    model = _prograd(tiny_clip, T=2.0)
    _perturb(model)
    model.train()
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 2, 1, 1, 0])
    logits = model(images)
    teacher = model._teacher_logits
    forward = clip_ops(tiny_clip)
    assert_close(teacher, _teacher_logits(tiny_clip, PETS, NAMES, images), ops=forward, what="teacher logits")
    assert_close(logits, _student_logits(tiny_clip, model.prompt_learner.ctx, PETS, NAMES, images).detach(),
                 ops=forward, what="student logits")
    xe, kl = model.losses(logits, labels)
    expected_kl = F.cross_entropy(logits / 2, F.softmax(teacher / 2, dim=-1)) * 4
    assert_close(xe, F.cross_entropy(logits, labels), ops=ops(len(NAMES), depth=3), what="xe")
    assert_close(kl, expected_kl, ops=ops(len(NAMES) * len(images), depth=3), what="kl")
    # the official "KL" is the cross-entropy to the teacher: the KL divergence plus the teacher's entropy
    p = F.softmax(teacher / 2, dim=-1)
    divergence = F.kl_div(F.log_softmax(logits / 2, dim=-1), p, reduction="batchmean") * 4
    entropy = -(p * p.log()).sum(1).mean() * 4
    assert_close(kl, divergence + entropy, ops=ops(len(NAMES) * len(images), depth=4), what="kl = KL + H")
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.loss(logits, labels)  # the teacher logits serve one loss


def test_projection_rule():
    a, conflicting, aligned = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(project(a, aligned, 1.0), a)  # no conflict: the cross-entropy gradient itself
    full = project(a, conflicting, 1.0)  # conflict: the component against the KL gradient removed
    assert_close(full, torch.tensor([[0.5, 0.5]]), ops=ops(2, depth=3))
    assert abs(float((full * conflicting).sum())) < 1e-6
    partial = project(a, conflicting, 0.8)
    assert_close(partial, torch.tensor([[0.6, 0.4]]), ops=ops(2, depth=3))


@pytest.mark.parametrize("agree", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.8])
def test_gradient_is_the_official_step(tiny_clip, agree, lam):
    """float64 on both sides: the model's single backward (the harness's loop) leaves in
    ``ctx.grad`` what the official two backward passes and projection leave there."""
    model = _prograd(tiny_clip.double(), LAMBDA=lam)
    _perturb(model, scale=0.2)
    clip = model.clip
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    teacher = _teacher_logits(clip, PETS, NAMES, images)
    # labels the teacher agrees with, or the ones it finds least likely (the gradients then conflict)
    labels = teacher.argmax(dim=1) if agree else teacher.argmin(dim=1)
    ctx0 = model.prompt_learner.ctx.detach().clone()
    want, conflict, xe, _ = _official_step_gradient(clip, ctx0, PETS, NAMES, images, labels, lam=lam)
    assert conflict is not agree  # both branches of the official rule are exercised

    model.train()
    loss = model.loss(model(images), labels)
    assert_close(loss, xe, ops=clip_ops(clip), what="the returned loss is the cross-entropy")
    loss.backward()
    got = model.prompt_learner.ctx.grad
    assert got.dtype == torch.float64
    assert_close(got, want, ops=clip_ops(clip, passes=3), what="projected gradient")
    if conflict and lam == 1.0:  # nothing left against the KL direction
        kl_grad = torch.autograd.grad(F.cross_entropy(_student_logits(clip, ctx0.requires_grad_(True), PETS, NAMES, images),
                                                      F.softmax(teacher, dim=-1)), ctx0)[0]
        assert abs(float((got * kl_grad).sum())) <= 1e-9 * float(got.norm() * kl_grad.norm())


def test_one_sgd_step_of_the_harness_loop_is_the_official_update(tiny_clip):
    model = _prograd(tiny_clip.double())
    _perturb(model, scale=0.2)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([2, 0, 1, 2])
    ctx0 = model.prompt_learner.ctx.detach().clone()
    want, _, _, _ = _official_step_gradient(model.clip, ctx0, PETS, NAMES, images, labels)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    model.train()
    optimizer_step(model.loss(model(images), labels), optimizer)
    # SGD's first step: p - lr * (g + wd * p)
    expected = ctx0 - 0.002 * (want + 5e-4 * ctx0)
    assert_close(model.prompt_learner.ctx, expected, ops=clip_ops(model.clip, passes=3), scale=float(ctx0.abs().max()))


def test_half_precision_layout(tiny_clip):
    """fp16 (the official default): CLIP and the context in half precision, the teacher an
    fp32 copy (CLIP itself untouched); student logits and the cross-entropy half, the KL fp32,
    the gradients and their projection half."""
    clip = cast_clip(tiny_clip, "fp16")
    model = _prograd(clip)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    logits = model(images.half())
    assert logits.dtype == torch.float16 and model._teacher_logits.dtype == torch.float32
    teacher = model.teacher()
    assert teacher is not model.clip and teacher.visual.conv1.weight.dtype == torch.float32
    assert torch.equal(teacher.visual.conv1.weight, model.clip.visual.conv1.weight.float())
    assert model.clip.visual.conv1.weight.dtype == torch.float16
    # not a submodule: no parameters, nothing in the state dict
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in clip.parameters()) + 16 * 64
    xe, kl = model.losses(logits, torch.tensor([0, 1, 2, 0]))
    assert xe.dtype == torch.float16 and kl.dtype == torch.float32
    loss = model.loss(model(images.half()), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.prompt_learner.ctx.grad.dtype == torch.float16 and torch.isfinite(model.prompt_learner.ctx.grad).all()
    model.on_train_end()
    assert model._teacher is None  # the fp32 copy is freed after training


# -- class names, other datasets, checkpoints ---------------------------------------------------------
def test_other_datasets_use_their_own_template(tiny_clip):
    """The official evaluation rebuilds the learner for the dataset it classifies: the written
    context follows that dataset's template, the learned vectors stay."""
    model = _prograd(tiny_clip, dataset="imagenet")
    _perturb(model)
    ctx = model.prompt_learner.ctx.detach().clone()
    assert model.prompt_learner.prefix_text.endswith("X a photo of a")
    model.use_dataset(dataset_context("oxford_pets", ["abyssinian", "pug"]))
    assert model.prompt_learner.prefix_text.endswith("X a type of pet, a photo of a")
    assert torch.equal(model.prompt_learner.ctx, ctx)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model.eval()(images), _student_logits(tiny_clip, ctx, PETS, ["abyssinian", "pug"], images),
                     ops=clip_ops(tiny_clip))
    model.train()
    model(images)
    assert_close(model._teacher_logits, _teacher_logits(tiny_clip, PETS, ["abyssinian", "pug"], images),
                 ops=clip_ops(tiny_clip))


def test_truncated_text_pass_gives_the_same_logits_and_gradients(tiny_clip):
    grads, logits = [], []
    for on in (False, True):
        model = _prograd(copy.deepcopy(tiny_clip), **{"SPEED.TRUNCATE_TEXT": on})
        _perturb(model)
        model.train()
        out = model(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        model.loss(out, torch.tensor([0, 1, 2])).backward()
        logits.append(out.detach())
        grads.append(model.prompt_learner.ctx.grad)
    assert_close(logits[1], logits[0], ops=clip_ops(tiny_clip))
    assert_close(grads[1], grads[0], ops=clip_ops(tiny_clip, passes=3))


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = _prograd(tiny_clip)
    _perturb(trained, scale=0.2)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "prompt_learner" / "model.pth.tar-100", 100)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == {"ctx", "token_prefix", "token_suffix"}
    fresh = _prograd(copy.deepcopy(tiny_clip), names=["x", "y"], seed=5)
    assert benchmark.load_official_checkpoint(fresh, path)["epoch"] == 100
    fresh.set_classnames(NAMES)
    trained.eval(), fresh.eval()
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


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
    cross-entropy falls and the base classes beat zero-shot CLIP."""
    from datasets.toy import write_toy_root

    root = write_toy_root(tmp_path / "toy", ["eurosat"], sizes={"train": 16, "val": 2, "test": 12})
    zs = _cli_records(root, tmp_path / "zs", "zsclip", "eurosat")["zsclip"]
    run = _cli_records(root, tmp_path / "pg", "prograd", "eurosat", "OPTIM.MAX_EPOCH", "10")["prograd"]
    losses = run["train"]["epoch_losses"]
    assert len(losses) == 10 and min(losses[-3:]) < 0.7 * losses[0], losses
    assert run["metrics"]["base"]["accuracy"] >= zs["metrics"]["base"]["accuracy"] + 5, (run["metrics"], zs["metrics"])


@pytest.mark.slow
def test_runs_end_to_end_on_the_command_line(tmp_path):
    run = _cli_records(None, tmp_path / "out", "prograd", "eurosat", "OPTIM.MAX_EPOCH", "1",
                       "DATALOADER.NUM_WORKERS", "0")["prograd"]
    assert run["status"] == "ok" and set(run["metrics"]) == {"base", "novel"}
    assert run["train"]["steps"] > 0 and run["compute"]["trainable_params"] == 16 * 64
    assert run["config"]["TRAINER"]["PROGRAD"]["LAMBDA"] == 1.0
