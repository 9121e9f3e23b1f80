"""TCP: the class-aware tokens and where they enter, the prompts and templates, the loss and its
gradients against a re-implementation of the official forward, precision, the optimiser's eps,
official checkpoints, the command line and the toy world."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close, assert_restored, clip_ops, logit_scale

import benchmark
from benchmark.backbone import tokenize
from benchmark.models import dataset_context
from datasets.worlds import dataset_template
from methods.registry import MethodError
from methods.tcp import GENERIC_PROMPT, tcp_templates

REPO = Path(__file__).resolve().parent.parent
NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
PETS = ("a photo of a {}, a type of pet.", "X X X X {}, a type of pet.")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tcp(clip, names=NAMES, dataset="oxford_pets", **kw):
    torch.manual_seed(0)
    return benchmark.build("tcp", names, clip=clip, dataset=dataset, **kw)


def _perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- the official forward, re-implemented --------------------------------------------------------------
def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _official_text(clip, ctx, meta, names, templates):
    """CustomCLIP's text side: the hand-written prompts -> meta-net -> 4 tokens per class, written
    over positions 1..4 of the input of block index 8 (weight 1.0) of the learned prompts."""
    handcrafted, prompt = templates
    hand = clip.encode_text(tokenize([handcrafted.format(n.replace("_", " ")) for n in names]))
    hand = hand / hand.norm(dim=-1, keepdim=True)
    w1, b1, w2, b2 = meta
    tokens_cls = F.linear(_quick_gelu(F.linear(hand, w1, b1)), w2, b2).reshape(len(names), -1, ctx.shape[-1])
    tokens = tokenize([prompt.format(n.replace("_", " ")) for n in names])
    emb = clip.token_embedding(tokens)
    x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), emb[:, 1 + ctx.shape[0]:]], dim=1)
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if i == 8:
            x = torch.cat([x[:, :1], 1.0 * tokens_cls + (1 - 1.0) * x[:, 1:5], x[:, 5:]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    text = clip.ln_final(x)[torch.arange(len(names)), tokens.argmax(-1)] @ clip.text_projection
    return text, hand


def _official_logits_and_loss(clip, learner_params, images, labels, names=NAMES, templates=PETS):
    ctx, *meta = learner_params
    text, hand = _official_text(clip, ctx, meta, names, templates)
    image = clip.encode_image(images)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = clip.logit_scale.exp() * image @ text.t()
    score = 1.0 - torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, hand / hand.norm(dim=-1, keepdim=True)).mean()
    return logits, F.cross_entropy(logits, labels) + 8.0 * score


# -- configuration --------------------------------------------------------------------------------------
def test_official_config_and_schedule_per_dataset():
    cfg = benchmark.make_config("tcp", "oxford_pets")
    o, t = cfg.OPTIM, cfg.TRAINER.TCP
    assert (o.NAME, o.LR, o.MAX_EPOCH, o.WEIGHT_DECAY, o.LR_SCHEDULER) == ("adam", 0.002, 50, 5e-4, "cosine")
    assert (o.WARMUP_EPOCH, o.WARMUP_TYPE, o.WARMUP_CONS_LR) == (1, "constant", 1e-5)
    assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.DATALOADER.TEST.BATCH_SIZE) == (32, 500)
    assert (t.N_CTX, t.CSC, t.CTX_INIT, t.W, t.PREC, t.ADAM_EPS) == (4, False, False, 8.0, "fp16", 1e-3)
    # train.py: ImageNet and SUN397 train 25 epochs (also ImageNet's training for the transfer protocols)
    for dataset, protocol in (("imagenet", "base2novel"), ("sun397", "base2novel"), ("imagenet", "few_shot")):
        assert benchmark.make_config("tcp", dataset, protocol).OPTIM.MAX_EPOCH == 25
    assert benchmark.make_config("tcp", "eurosat", "few_shot", shots=4).OPTIM.MAX_EPOCH == 50


def test_the_trainer_builds_adam_with_the_official_eps(tiny_clip, tmp_path, monkeypatch):
    from PIL import Image

    from benchmark import trainer
    from datasets.base import Datum

    model = _tcp(tiny_clip, **{"OPTIM.MAX_EPOCH": 1, "DATALOADER.NUM_WORKERS": 0, "INPUT.SIZE": (32, 32),
                               "DATALOADER.TRAIN_X.BATCH_SIZE": 3})
    built = []
    original = trainer.build_optimizer

    def spy(params, cfg, eps=None):
        built.append(original(params, cfg, eps=eps))
        return built[-1]

    monkeypatch.setattr(trainer, "build_optimizer", spy)
    data = []
    for label in range(3):
        path = tmp_path / f"{label}.png"
        Image.new("RGB", (32, 32), (80 * label, 40, 200 - 60 * label)).save(path)
        data.append(Datum(str(path), label, NAMES[label]))
    result = trainer.train(model, data, model.cfg, torch.device("cpu"), "fp32")
    assert result.steps == 1
    (optimizer,) = built
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam) and group["eps"] == 1e-3 and group["weight_decay"] == 5e-4
    assert {id(p) for p in group["params"]} == {id(p) for p in model.prompt_learner.parameters()}


def test_official_template_tables():
    assert tcp_templates(dataset_context("oxford_pets")) == PETS
    assert tcp_templates(dataset_context("fgvc_aircraft")) == ("a photo of an aircraft {}.",
                                                               "X X X X {}, a type of aircraft.")
    assert tcp_templates(dataset_context("dtd")) == ("a photo of a {}, a type of texture.", "X X X X {} texture.")
    assert tcp_templates(dataset_context("food101")) == ("a photo of a {}, a type of food.", "X X X X {}, a type of food.")
    assert tcp_templates(dataset_context("stanford_cars")) == ("a photo of a {}.", "X X X X {}, a type of car")
    assert tcp_templates(dataset_context("eurosat")) == ("a centered satellite photo of {}.", "X X X X {}.")
    assert tcp_templates(dataset_context("ucf101")) == ("a photo of a person doing {}.", "a photo of a person doing {}.")
    for name in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert tcp_templates(dataset_context(name)) == ("a photo of a {}.", "a photo of a {}.")
    # outside the official tables: the dataset's own template, the generic learned form
    assert tcp_templates(dataset_context("eurosat", world="toy")) == (dataset_template("eurosat", "toy"), GENERIC_PROMPT)
    assert tcp_templates(dataset_context("my_data")) == ("a photo of a {}.", GENERIC_PROMPT)


# -- initialisation and placement ------------------------------------------------------------------------
def test_initialisation_and_official_names(tiny_clip):
    model = _tcp(tiny_clip)
    learner = model.prompt_learner
    width, embed = tiny_clip.ln_final.weight.shape[0], tiny_clip.text_projection.shape[1]
    assert learner.ctx.shape == (4, width)
    assert learner.meta_net.linear1.weight.shape == (embed // 4, embed)
    assert learner.meta_net.linear2.weight.shape == (4 * width, embed // 4)
    assert set(learner.state_dict()) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                         "meta_net.linear2.weight", "meta_net.linear2.bias", "token_prefix",
                                         "token_suffix"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"prompt_learner.{n}" for n, _ in learner.named_parameters()}
    torch.manual_seed(0)
    wide = benchmark.build("tcp", NAMES, clip=copy.deepcopy(tiny_clip), N_CTX=16)
    assert wide.prompt_learner.ctx.std().item() == pytest.approx(0.02, rel=0.1)  # N(0, 0.02^2)
    # CTX_INIT is a switch: true starts the context from the words "a photo of a"
    words = _tcp(copy.deepcopy(tiny_clip), CTX_INIT=True).prompt_learner.ctx
    assert torch.equal(words, tiny_clip.token_embedding(tokenize(["a photo of a"]))[0, 1:5])  # copied rows
    with pytest.raises(MethodError, match="CSC"):
        _tcp(copy.deepcopy(tiny_clip), CSC=True)


def test_class_tokens_enter_the_ninth_text_block(tiny_clip):
    model = _tcp(tiny_clip)
    _perturb(model)
    seen = {}
    blocks = tiny_clip.transformer.resblocks
    hooks = [blocks[i].register_forward_pre_hook(lambda m, args, kw, i=i: seen.__setitem__(i, args[0].detach()),
                                                 with_kwargs=True) for i in (7, 8)]
    with torch.no_grad():
        model.encode_text()
        tokens = model.prompt_learner.class_tokens(model.handcrafted_features)
    for h in hooks:
        h.remove()
    assert tokens.shape == (3, 4, tiny_clip.ln_final.weight.shape[0])
    # positions 1..4 of block index 8's input are the class tokens themselves: exact, as the forward
    # computes them with the same operations on the same inputs (1.0 * tokens + 0.0 * context)
    assert torch.equal(seen[8][:, 1:5], tokens)
    assert not torch.allclose(seen[7][:, 1:5], tokens)  # below it, the learned context's positions
    short = copy.deepcopy(tiny_clip)
    short.transformer.resblocks = short.transformer.resblocks[:8]
    with pytest.raises(MethodError, match="text block 9"):
        _tcp(short)


def test_logits_loss_and_gradients_equal_the_official_forward(tiny_clip):
    # an exact equation check: both sides in float64
    model = _tcp(tiny_clip.double()).double()
    _perturb(model)
    model.train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    labels = torch.tensor([0, 2, 1, 2])
    logits = model(images)
    loss = model.loss(logits, labels)
    loss.backward()
    learner = model.prompt_learner
    names = ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
             "meta_net.linear2.bias"]
    ours = {n: dict(learner.named_parameters())[n].grad.clone() for n in names}
    reference = [dict(learner.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]
    ref_logits, ref_loss = _official_logits_and_loss(model.clip, reference, images, labels)
    ref_loss.backward()
    forward, backward = clip_ops(model.clip), clip_ops(model.clip, passes=2)
    assert_close(logits, ref_logits, ops=forward, what="logits")
    assert_close(loss, ref_loss, ops=forward, what="loss")
    assert model._score.item() > 1e-3  # the regulariser is live
    for name, ref in zip(names, reference):
        assert ref.grad.abs().sum() > 0, name
        assert_close(ours[name], ref.grad, ops=backward, what=name)
    # W scales the regulariser only (the official forward writes 8.0, the official W)
    model.weight = 0.0
    assert_close(model.loss(logits, labels), F.cross_entropy(ref_logits, labels), ops=forward, what="W = 0")


def test_other_classes_get_their_own_knowledge_and_templates(tiny_clip):
    model = _tcp(tiny_clip)
    aircraft = ["707-320", "A300B4"]
    model.use_dataset(dataset_context("fgvc_aircraft", aircraft))
    with torch.no_grad():
        hand = F.normalize(tiny_clip.encode_text(tokenize([f"a photo of an aircraft {n}." for n in aircraft])), dim=-1)
    assert_close(model.handcrafted_features, hand, ops=clip_ops(tiny_clip))
    assert torch.equal(model.prompt_learner.tokenized_prompts,
                       tokenize([f"X X X X {n}, a type of aircraft." for n in aircraft]))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2)


def test_half_precision_layout(tiny_clip):
    from benchmark.precision import cast_clip

    model = _tcp(cast_clip(copy.deepcopy(tiny_clip), "fp16"))
    learner = model.prompt_learner
    assert learner.ctx.dtype == learner.meta_net.linear1.weight.dtype == learner.token_prefix.dtype == torch.float16
    assert model.handcrafted_features.dtype == torch.float16
    assert benchmark.make_config("tcp", "dtd").TRAINER.TCP.PREC == "fp16"


def test_official_checkpoint_round_trip(tiny_clip, tmp_path):
    trained = _tcp(tiny_clip)
    _perturb(trained, scale=0.2)
    path = benchmark.save_official_checkpoint(trained, tmp_path / "prompt_learner" / "model.pth.tar-50", 50)
    assert set(torch.load(path, weights_only=True)["state_dict"]) == {
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
        "meta_net.linear2.bias", "token_prefix", "token_suffix"}
    fresh = _tcp(copy.deepcopy(tiny_clip), names=["x", "y"])
    assert benchmark.load_official_checkpoint(fresh, path)["epoch"] == 50
    fresh.set_classnames(NAMES)
    trained.eval(), fresh.eval()
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


def test_harness_checkpoint_restores_weights_and_class_names(tiny_clip, tmp_path):
    from benchmark import checkpoint as ckpt

    trained = _tcp(tiny_clip)
    _perturb(trained, scale=0.2)
    ckpt.save(trained, tmp_path / "run.pt")
    fresh = _tcp(copy.deepcopy(tiny_clip), names=["x", "y"])
    ckpt.load(fresh, tmp_path / "run.pt")
    assert fresh.classnames == NAMES and fresh.handcrafted_features.shape[0] == 3
    trained.eval(), fresh.eval()
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=logit_scale(tiny_clip))


# -- the command line and the toy world ---------------------------------------------------------------
@pytest.mark.slow
def test_base_to_novel_run_end_to_end_on_the_synthetic_world(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--world", "synthetic", "--methods", "tcp",
                             "--datasets", "eurosat", "--seeds", "1", "--output", str(out), "--opts",
                             "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0"],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    from benchmark import store

    (record,) = list(store.iter_records(out))
    assert record["status"] == "ok" and record["method"] == "tcp" and set(record["metrics"]) == {"base", "novel"}
    assert record["train"]["steps"] > 0 and record["train"]["learning_rates"] == [1e-5]  # the constant warm-up epoch
    assert record["config"]["TRAINER"]["TCP"]["ADAM_EPS"] == 1e-3


@pytest.mark.slow
def test_learns_in_the_toy_world(tmp_path):
    from benchmark import cli, store
    from datasets.toy import write_toy_root

    root = tmp_path / "toy"
    write_toy_root(root, ["eurosat"], sizes={"train": 16, "val": 2, "test": 12})

    def record(method, *opts):
        out = tmp_path / method
        args = ["run", "--methods", method, "--datasets", "eurosat", "--seeds", "1", "--root", str(root),
                "--output", str(out), "-q", "--opts", "DATALOADER.NUM_WORKERS", "0", *opts]
        assert cli.main(args) == 0
        (rec,) = list(store.iter_records(out))
        return rec

    zero_shot = record("zsclip")["metrics"]["base"]["accuracy"]
    # 20 epochs at a larger step than the official 0.002, so that a CPU sees learning in seconds
    tcp = record("tcp", "OPTIM.MAX_EPOCH", "20", "OPTIM.LR", "0.01")
    assert tcp["metrics"]["base"]["accuracy"] >= zero_shot + 10, (tcp["metrics"], zero_shot)
    assert tcp["train"]["epoch_losses"][-1] < tcp["train"]["epoch_losses"][0]
