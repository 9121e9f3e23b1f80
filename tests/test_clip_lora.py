"""CLIP-LoRA: placement, the low-rank update on the fused q/k/v weight, dropout and merging,
the official loop, precision, the official LoRA file, the command line and the toy world."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tolerance import assert_close, assert_restored, clip_ops

import benchmark
from benchmark.backbone import tokenize
from benchmark.models import dataset_context
from benchmark.trainer import FitContext
from datasets.base import Datum
from methods.clip_lora import adapted_blocks, lora_layers
from methods.registry import MethodError

REPO = Path(__file__).resolve().parent.parent
NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(clip, names=NAMES, dataset="oxford_pets", **kw):
    torch.manual_seed(0)
    kw.setdefault("DATALOADER.NUM_WORKERS", 0)
    kw.setdefault("INPUT.SIZE", (32, 32))
    return benchmark.build("clip_lora", names, clip=clip, dataset=dataset, **kw)


def _perturb(model, seed=1, scale=0.1):
    """Non-zero B (A is already random): the update is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lora.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _loras(layer):
    return {name: (m.w_lora_A, m.w_lora_B) for name, m in layer.named_children()} if layer is not None else {}


# -- an independent re-implementation: separate q, k, v projections, explicit softmax attention ----
def _ref_block(block, x, mask, loras, scale):
    attn = block.attn
    d, heads = attn.embed_dim, attn.num_heads
    hd = d // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    h = block.ln_1(x)

    def proj(name, weight, bias, inp):
        y = inp @ weight.t() + bias
        if name in loras:
            a, bb = loras[name]
            y = y + scale * (inp @ a.t()) @ bb.t()
        return y

    q = proj("q_proj", w[:d], b[:d], h)
    k = proj("k_proj", w[d:2 * d], b[d:2 * d], h)
    v = proj("v_proj", w[2 * d:], b[2 * d:], h)
    n, length, _ = x.shape
    q, k, v = (t.reshape(n, length, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(n, length, d)
    x = x + proj("proj", attn.out_proj.weight, attn.out_proj.bias, out)
    return x + block.mlp(block.ln_2(x))


def _ref_logits(clip, learner, images, prompts, scale):
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for block, layer in zip(v.transformer.resblocks, learner.visual):
        x = _ref_block(block, x, None, _loras(layer), scale)
    image = v.ln_post(x[:, 0]) @ v.proj
    tokens = tokenize(prompts)
    t = clip.token_embedding(tokens) + clip.positional_embedding
    for block, layer in zip(clip.transformer.resblocks, learner.text):
        t = _ref_block(block, t, clip.attn_mask, _loras(layer), scale)
    text = clip.ln_final(t)[torch.arange(len(prompts)), tokens.argmax(-1)] @ clip.text_projection
    return 100.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def _prompts(names=NAMES):
    return [f"a photo of a {n.replace('_', ' ')}." for n in names]


# -- configuration and placement ---------------------------------------------------------------------
@pytest.mark.parametrize("dataset,protocol,shots", [("oxford_pets", "few_shot", 1), ("imagenet", "few_shot", 16),
                                                    ("eurosat", "base2novel", 16), ("dtd", "few_shot", 4)])
def test_one_official_setting_for_every_dataset_and_shot_count(dataset, protocol, shots):
    cfg = benchmark.make_config("clip_lora", dataset, protocol, shots=shots)
    o, t = cfg.OPTIM, cfg.TRAINER.CLIP_LORA
    assert (o.NAME, o.LR, o.WEIGHT_DECAY, o.ADAM_BETA1, o.ADAM_BETA2) == ("adamw", 2e-4, 0.01, 0.9, 0.999)
    assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.DATALOADER.TEST.BATCH_SIZE) == (32, 256)
    assert tuple(cfg.INPUT.RRCROP_SCALE) == (0.08, 1.0) and cfg.INPUT.INTERPOLATION == "bicubic"
    assert (t.POSITION, t.ENCODER, list(t.PARAMS), t.R, t.ALPHA, t.DROPOUT_RATE) == ("all", "both", ["q", "k", "v"],
                                                                                      2, 1, 0.25)
    assert (t.N_ITERS, t.ETA_MIN, t.PREC, t.TEMPLATE) == (500, 1e-6, "fp16", "")


def test_official_position_tables():
    assert adapted_blocks("all", 12, "text") == list(range(12)) == adapted_blocks("all", 12, "vision")
    assert adapted_blocks("all", 24, "vision") == list(range(21))  # the official ViT-L/14 table stops at 20
    assert adapted_blocks("up", 12, "vision") == [8, 9, 10, 11] and adapted_blocks("bottom", 12, "text") == [0, 1, 2, 3]
    assert adapted_blocks("half-up", 12, "text") == [6, 7, 8, 9, 10, 11] and adapted_blocks("top1", 12, "text") == [11]
    assert adapted_blocks("up", 1, "text") == []  # a one-block tower: no block 8..11
    with pytest.raises(MethodError, match="official positions"):
        adapted_blocks("middle", 12, "text")


def test_placement_names_and_vit_b16_count(tiny_clip):
    model = _build(tiny_clip)
    for tower, width in ((model.lora.text, 64), (model.lora.visual, 128)):
        assert len(tower) == 12 and all(layer is not None for layer in tower)
        for layer in tower:
            assert [n for n, _ in layer.named_children()] == ["q_proj", "k_proj", "v_proj"]
            assert layer.q_proj.w_lora_A.shape == (2, width) and layer.q_proj.w_lora_B.shape == (width, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("lora.")}
    assert all(n.endswith(("w_lora_A", "w_lora_B")) for n in trainable)
    # ViT-B/16: 12 text blocks of width 512, 12 image blocks of width 768, q, k, v, r = 2
    text = lora_layers(512, 12, range(12), ["q", "k", "v"], 2, 1, 0.25)
    image = lora_layers(768, 12, range(12), ["q", "k", "v"], 2, 1, 0.25)
    assert sum(p.numel() for m in (text, image) for p in m.parameters()) == 12 * 3 * (2 * 512 * 2 + 2 * 768 * 2) == 184_320
    # other switches: the image tower's top blocks only, the output projection too
    top = _build(copy.deepcopy(tiny_clip), POSITION="up", ENCODER="vision", PARAMS=["q", "v", "o"])
    assert all(layer is None for layer in top.lora.text)
    assert [i for i, layer in enumerate(top.lora.visual) if layer is not None] == [8, 9, 10, 11]
    assert [n for n, _ in top.lora.visual[8].named_children()] == ["q_proj", "v_proj", "proj"]


def test_initialisation_and_scaling(tiny_clip):
    model = _build(tiny_clip)
    layers = model.lora.official_layers()
    assert all((m.w_lora_B == 0).all() for layer in layers for m in layer.children())
    # A as nn.Linear's weight: Kaiming-uniform with a = sqrt 5, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))
    a = torch.cat([m.w_lora_A.flatten() for layer in model.lora.visual for m in layer.children()])
    bound = 1 / math.sqrt(128)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # the official scaling: alpha / sqrt(r)
    assert layers[0].q_proj.scaling == pytest.approx(1 / math.sqrt(2))
    assert _build(copy.deepcopy(tiny_clip), R=4, ALPHA=2).lora.text[0].q_proj.scaling == pytest.approx(1.0)
    # B = 0: the model starts as zero-shot CLIP with "a photo of a {}." and a fixed logit scale 100
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        image = F.normalize(tiny_clip.encode_image(images), dim=-1)
        text = F.normalize(tiny_clip.encode_text(tokenize(_prompts())), dim=-1)
        assert_close(model(images), 100.0 * image @ text.t(), ops=clip_ops(tiny_clip), what="initial logits")


def test_prompt_template(tiny_clip):
    # the official dataset files all use "a photo of a {}." (their specific templates are commented out)
    for dataset in ("oxford_pets", "dtd", "eurosat", "imagenet"):
        model = _build(copy.deepcopy(tiny_clip), dataset=dataset)
        assert model.template == "a photo of a {}."
    assert torch.equal(model.tokens, tokenize(_prompts()))
    model.use_dataset(dataset_context("ucf101", ["Apply_Eye_Makeup"]))
    assert torch.equal(model.tokens, tokenize(["a photo of a Apply Eye Makeup."]))
    toy = dataset_context("eurosat", NAMES, world="toy")
    assert model.__class__(tiny_clip, NAMES, model.cfg, dataset=toy).template == toy.template
    assert _build(copy.deepcopy(tiny_clip), TEMPLATE="itap of a {}.").template == "itap of a {}."


# -- the defining computation ---------------------------------------------------------------------------
def test_update_sits_on_the_right_rows_of_the_fused_in_proj_weight(tiny_clip):
    """Merged into a copy of CLIP (rows 0..d-1 += s B_q A_q, d..2d-1 += s B_k A_k, 2d..3d-1 += s B_v A_v,
    the output projection += s B_o A_o), CLIP's own attention gives the model's logits."""
    model = _build(tiny_clip.double(), PARAMS=["q", "k", "v", "o"]).double()
    _perturb(model)
    merged = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        for blocks, layers in ((merged.transformer.resblocks, model.lora.text),
                               (merged.visual.transformer.resblocks, model.lora.visual)):
            for block, layer in zip(blocks, layers):
                d = block.attn.embed_dim
                for rows, m in zip((slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)),
                                   (layer.q_proj, layer.k_proj, layer.v_proj)):
                    block.attn.in_proj_weight[rows] += m.scaling * m.w_lora_B @ m.w_lora_A
                block.attn.out_proj.weight += layer.proj.scaling * layer.proj.w_lora_B @ layer.proj.w_lora_A
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    model.eval()
    with torch.no_grad():
        expected = 100.0 * F.normalize(merged.encode_image(images), dim=-1) @ \
            F.normalize(merged.encode_text(tokenize(_prompts())), dim=-1).t()
        got = model(images)
        plain = 100.0 * F.normalize(tiny_clip.encode_image(images), dim=-1) @ \
            F.normalize(tiny_clip.encode_text(tokenize(_prompts())), dim=-1).t()
    assert_close(got, expected, ops=clip_ops(tiny_clip), what="merged logits")
    assert not torch.allclose(got, plain, atol=1e-3)  # the update matters


@pytest.mark.parametrize("options", [{}, {"PARAMS": ["q", "v", "o"], "POSITION": "up", "ENCODER": "text"},
                                     {"DROPOUT_RATE": 0.0, "R": 4, "ALPHA": 3}])
def test_logits_and_gradients_equal_explicit_qkv_attention(tiny_clip, options):
    """Training mode, both sides in float64: the frozen projections plus s (x A^T) B^T, attention
    written out per head.  Dropout is switched off on both sides (its masks are random)."""
    model = _build(tiny_clip.double(), **options).double()
    _perturb(model)
    for m in model.lora.modules():
        if getattr(m, "dropout", None) is not None:
            m.dropout = torch.nn.Identity()  # keeps the unmerged training branch of the official layer
    model.train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)).double()
    labels = torch.tensor([2, 0, 1])
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    ours = {n: p.grad.clone() for n, p in model.lora.named_parameters()}

    reference = copy.deepcopy(model.lora)
    reference.zero_grad()
    scale = next(model.lora.official_layers()[0].children()).scaling
    expected = _ref_logits(model.clip, reference, images, _prompts(), scale)
    F.cross_entropy(expected, labels).backward()
    assert_close(logits, expected, ops=clip_ops(model.clip), what="logits")
    for name, p in reference.named_parameters():
        assert p.grad.abs().sum() > 0, name
        assert_close(ours[name], p.grad, ops=clip_ops(model.clip, passes=2), what=name)


def test_dropout_acts_on_the_low_rank_branch_only_and_evaluation_merges(tiny_clip):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        frozen = 100.0 * F.normalize(tiny_clip.encode_image(images), dim=-1) @ \
            F.normalize(tiny_clip.encode_text(tokenize(_prompts())), dim=-1).t()
    # dropout 1: in training the whole update is dropped, the frozen projections see every input
    model = _build(copy.deepcopy(tiny_clip), DROPOUT_RATE=1.0)
    _perturb(model)
    model.train()
    with torch.no_grad():
        assert_close(model(images), frozen, ops=clip_ops(tiny_clip), what="dropped update")
        model.eval()
        assert not torch.allclose(model(images), frozen, atol=1e-3)  # evaluation: the update, merged, no dropout
    # the official rate: random in training (one mask per projection), deterministic in evaluation
    model = _build(copy.deepcopy(tiny_clip))
    _perturb(model)
    drops = [m.dropout for layer in model.lora.official_layers() for m in layer.children()]
    assert len({id(d) for d in drops}) == len(drops) and all(d.p == 0.25 for d in drops)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))
        model.eval()
        assert torch.equal(model(images), model(images))  # the same operations twice: deterministic to the bit


def test_precision_layout(tiny_clip):
    from benchmark.precision import cast_clip

    half = cast_clip(copy.deepcopy(tiny_clip), "fp16")
    model = _build(half)
    assert model.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in model.lora.parameters())  # official: new fp32 Linear layers
    # the fp16 autocast of the official run is a GPU's; on a CPU every pass is fp32, without a scaler
    assert not isinstance(model._autocast(), torch.autocast)
    assert benchmark.make_config("clip_lora", "eurosat").TRAINER.CLIP_LORA.PREC == "fp16"


# -- the official loop ---------------------------------------------------------------------------------
def _images(root, names, per_class, seed=0, size=32):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for label, name in enumerate(names):
        tint = rng.integers(0, 255, size=3)
        for i in range(per_class):
            pixels = np.clip(tint + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{label}_{i}.png")
            items.append(Datum(str(root / f"{label}_{i}.png"), label, name))
    return items


def _official_loop(model, ctx, total):
    """lora.py, literally: AdamW(wd 1e-2, betas), cosine to 1e-6 over every iteration, passes over
    the loader until the count is reached."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, weight_decay=1e-2, betas=(0.9, 0.999), lr=2e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
    loader = ctx.loader(ctx.train, augment=True, batch_size=2, shuffle=True)
    count, lrs = 0, []
    while count < total:
        model.train()
        for images, target in loader:
            loss = F.cross_entropy(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            count += 1
            if count == total:
                break
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_fit_is_the_official_iteration_loop(tiny_clip, tmp_path):
    train = _images(tmp_path / "train", NAMES, 3)
    # 3 shots x N_ITERS 2 = 6 iterations; batches of 2 over 9 images: 5 a pass, the last one partial,
    # so the second pass stops after its first batch
    model = _build(tiny_clip, shots=3, N_ITERS=2, **{"DATALOADER.TRAIN_X.BATCH_SIZE": 2})
    reference = copy.deepcopy(model)
    ctx = FitContext(train, [], model.cfg, torch.device("cpu"), "fp32")
    torch.manual_seed(11)
    report = model.fit(ctx)
    torch.manual_seed(11)
    lrs = _official_loop(reference, ctx, 6)
    assert report["iterations"] == report["steps"] == 6 and report["shots_counted"] == 3
    assert len(report["epoch_losses"]) == 2 and report["learning_rates"] == lrs
    assert report["trainable_params"] == sum(p.numel() for p in model.lora.parameters())
    # exact: both run the same forward, AdamW and schedule on the same batches and dropout draws in
    # this process (the claim: fit is that loop, step for step; Adam's per-element normalisation
    # leaves no rounding bound for weights of two different computations)
    for (name, p), q in zip(model.lora.named_parameters(), reference.lora.parameters()):
        assert torch.equal(p, q), name
    assert any((m.w_lora_B != 0).any() for layer in model.lora.official_layers() for m in layer.children())
    assert not model.training
    # the schedule: CosineAnnealingLR over the 6 iterations, down to 1e-6
    assert lrs[-1] == pytest.approx(1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * 6 / 6)) / 2, abs=1e-12)
    # every training image (shots 0): the images per class stand for the shots
    assert _build(copy.deepcopy(tiny_clip), shots=0).iterations(9) == (1500, 3)


# -- official files ------------------------------------------------------------------------------------
def test_official_lora_file_round_trip(tiny_clip, tmp_path):
    trained = _build(tiny_clip)
    _perturb(trained, seed=7)
    folder = tmp_path / "vitb16" / "oxford_pets" / "16shots" / "seed1"
    path = benchmark.save_official_checkpoint(trained, folder, 0)
    assert path == folder / "lora_weights.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["metadata"] == {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "k", "v"], "position": "all"}
    # the official list: the 12 text layers first, then the 12 image layers
    assert list(raw["weights"]) == [f"layer_{i}" for i in range(24)]
    assert raw["weights"]["layer_0"]["q_proj"]["w_lora_A"].shape == (2, 64)
    assert raw["weights"]["layer_12"]["v_proj"]["w_lora_B"].shape == (128, 2)
    assert set(raw["weights"]["layer_5"]) == {"q_proj", "k_proj", "v_proj"}

    fresh = _build(copy.deepcopy(tiny_clip), names=["x", "y"])
    assert benchmark.load_official_checkpoint(fresh, folder)["layers"] == 24
    fresh.set_classnames(NAMES)
    trained.eval(), fresh.eval()
    # logits: a fixed 100 times cosines
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=100.0)
    # a file written with other options is refused, as the official load_lora refuses it
    for options, key in (({"R": 4}, "r mismatch"), ({"POSITION": "up"}, "position mismatch"),
                         ({"PARAMS": ["q", "v"]}, "params mismatch")):
        with pytest.raises(MethodError, match=key):
            benchmark.load_official_checkpoint(_build(copy.deepcopy(tiny_clip), **options), path)


def test_harness_checkpoint_restores_weights_and_class_names(tiny_clip, tmp_path):
    from benchmark import checkpoint as ckpt

    trained = _build(tiny_clip)
    _perturb(trained, seed=5)
    ckpt.save(trained, tmp_path / "run.pt")
    fresh = _build(copy.deepcopy(tiny_clip), names=["x", "y"])
    ckpt.load(fresh, tmp_path / "run.pt")
    assert fresh.classnames == NAMES and torch.equal(fresh.tokens, trained.tokens)
    trained.eval(), fresh.eval()
    assert_restored(fresh, trained, torch.randn(2, 3, 32, 32), ops=clip_ops(tiny_clip), scale=100.0)


def test_file_written_like_the_official_save_lora_loads(tiny_clip, tmp_path):
    model = _build(tiny_clip, POSITION="top3", ENCODER="vision")
    g = torch.Generator().manual_seed(3)
    weights = {f"layer_{i}": {p: {"w_lora_A": torch.randn(2, 128, generator=g), "w_lora_B": torch.randn(128, 2, generator=g)}
                              for p in ("q_proj", "k_proj", "v_proj")} for i in range(3)}
    meta = {"r": 2, "alpha": 1, "encoder": "vision", "params": ["q", "k", "v"], "position": "top3"}
    torch.save({"weights": weights, "metadata": meta}, tmp_path / "lora_weights.pt")
    benchmark.load_official_checkpoint(model, tmp_path / "lora_weights.pt")
    assert torch.equal(model.lora.visual[9].q_proj.w_lora_A, weights["layer_0"]["q_proj"]["w_lora_A"])
    assert torch.equal(model.lora.visual[11].v_proj.w_lora_B, weights["layer_2"]["v_proj"]["w_lora_B"])


# -- the command line and the toy world ----------------------------------------------------------------
@pytest.mark.slow
def test_few_shot_run_end_to_end_on_the_synthetic_world(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--world", "synthetic", "--methods", "clip_lora",
                             "--protocol", "few_shot", "--shots", "2", "--datasets", "eurosat", "--seeds", "1",
                             "--output", str(out), "--opts", "TRAINER.CLIP_LORA.N_ITERS", "2",
                             "DATALOADER.NUM_WORKERS", "0"], check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    from benchmark import store

    (record,) = list(store.iter_records(out))
    assert record["status"] == "ok" and record["method"] == "clip_lora" and record["protocol"] == "few_shot"
    assert record["train"]["steps"] == 2 * 2 and record["train"]["fit"]["shots_counted"] == 2
    assert record["compute"]["trainable_params"] > 0 and record["metrics"]["test"]["accuracy"] >= 0


@pytest.mark.slow
def test_learns_in_the_toy_world(tmp_path):
    from benchmark import cli, store
    from datasets.toy import write_toy_root

    root = tmp_path / "toy"
    write_toy_root(root, ["eurosat"], sizes={"train": 16, "val": 2, "test": 12})

    def record(method, *opts):
        out = tmp_path / method
        args = ["run", "--methods", method, "--datasets", "eurosat", "--seeds", "1", "--root", str(root),
                "--output", str(out), "-q"]
        assert cli.main(args + (["--opts", *opts] if opts else [])) == 0
        (rec,) = list(store.iter_records(out))
        return rec

    zero_shot = record("zsclip", "DATALOADER.NUM_WORKERS", "0")["metrics"]["base"]["accuracy"]
    # 2 x 16 = 32 iterations; a larger step than the official 2e-4 so that a CPU sees learning in seconds
    lora = record("clip_lora", "TRAINER.CLIP_LORA.N_ITERS", "2", "OPTIM.LR", "0.005", "DATALOADER.NUM_WORKERS", "0")
    assert lora["train"]["steps"] == 32
    assert lora["metrics"]["base"]["accuracy"] >= zero_shot + 10, (lora["metrics"], zero_shot)
    assert lora["train"]["epoch_losses"][-1] < lora["train"]["epoch_losses"][0]
