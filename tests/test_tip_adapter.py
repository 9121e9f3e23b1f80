"""Tip-Adapter and Tip-Adapter-F on the tiny CLIP: the official logits, cache, search and
fine-tuning checked against straightforward re-implementations of the official code."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tolerance import assert_close, assert_restored, clip_ops, ops

import benchmark
import methods.tip_adapter  # noqa: F401  (registers tip_adapter and tip_adapter_f)
from benchmark.backbone import tokenize
from benchmark.images import ImageList
from benchmark.trainer import FitContext
from datasets.base import Datum
from methods.tip_adapter import (
    IMAGENET_TEMPLATES,
    search_alpha_beta,
    search_grid,
    tip_templates,
)

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


# -- independent re-implementations of the official code ----------------------------------------
def _official_classifier(clip, classnames, templates):
    """The official clip_classifier: one class at a time, columns of a (D, C) matrix."""
    columns = []
    with torch.no_grad():
        for name in classnames:
            emb = clip.encode_text(tokenize([t.format(name.replace("_", " ")) for t in templates]))
            emb /= emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            mean /= mean.norm()
            columns.append(mean)
    return torch.stack(columns, dim=1)


def _official_logits(clip, images, clip_weights, cache_keys_dn, cache_values, alpha, beta):
    with torch.no_grad():
        f = clip.encode_image(images)
        f /= f.norm(dim=-1, keepdim=True)
        clip_logits = 100. * f @ clip_weights
        affinity = f @ cache_keys_dn
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
        return clip_logits + cache_logits * alpha


def _official_search(scale, step, cache_keys_dn, cache_values, features, labels, clip_weights, adapter_w=None):
    """The official search_hp loop, literally."""
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alpha_list = [i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = features @ adapter_w.t() if adapter_w is not None else features @ cache_keys_dn
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            tip = 100. * features @ clip_weights + cache_logits * alpha
            pred = tip.topk(1, 1, True, True)[1].t()
            acc = 100 * float(pred.eq(labels.view(1, -1)).sum()) / labels.shape[0]
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc


# -- helpers --------------------------------------------------------------------------------------
def _images_on_disk(root, classnames, per_class, seed=0, size=40):
    """Real PNG files, one colour tint per class plus noise, as Datum lists."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for label, name in enumerate(classnames):
        tint = rng.integers(0, 255, size=3)
        for i in range(per_class):
            pixels = np.clip(tint + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            path = root / f"{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            items.append(Datum(str(path), label, name))
    return items


def _build(name, clip, classnames=NAMES, dataset="", **overrides):
    overrides.setdefault("DATALOADER.NUM_WORKERS", 0)
    overrides.setdefault("INPUT.SIZE", (32, 32))
    overrides.setdefault("TEMPLATES", TEMPLATES)
    return benchmark.build(name, classnames, clip=clip, dataset=dataset, **overrides)


def _ctx(model, train, val):
    return FitContext(train, val, model.cfg, torch.device("cpu"), "fp32")


@pytest.fixture(autouse=True)
def _one_thread():
    # the tiny model is faster on one thread, above all on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path):
    train = _images_on_disk(tmp_path / "train", NAMES, 3, seed=0)
    val = _images_on_disk(tmp_path / "val", NAMES, 2, seed=1)
    return train, val


# -- tests ------------------------------------------------------------------------------------------
def test_templates_per_dataset():
    from benchmark.models import dataset_context

    assert tip_templates(dataset_context("imagenet")) == list(IMAGENET_TEMPLATES) and len(IMAGENET_TEMPLATES) == 7
    assert tip_templates(dataset_context("oxford_pets")) == ["a photo of a {}, a type of pet."]
    assert tip_templates(dataset_context("dtd")) == ["{} texture."]
    assert tip_templates(dataset_context("eurosat"), override=["x {}"]) == ["x {}"]


def test_search_grid_is_the_official_one():
    grid = search_grid(7, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1)
    assert grid[-1] == pytest.approx(199 * 6.9 / 200 + 0.1) and grid[-1] < 7


def test_config_per_dataset():
    cfg = benchmark.make_config("tip_adapter_f", "eurosat")
    assert cfg.OPTIM.MAX_EPOCH == 100 and cfg.OPTIM.LR == 0.001
    assert cfg.TRAINER.TIP_ADAPTER_F.INIT_ALPHA == 2.0 and list(cfg.TRAINER.TIP_ADAPTER_F.SEARCH_SCALE) == [12.0, 10.0]
    assert tuple(cfg.INPUT.RRCROP_SCALE) == (0.5, 1.0) and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 256
    cfg = benchmark.make_config("tip_adapter", "fgvc_aircraft")
    assert cfg.TRAINER.TIP_ADAPTER.INIT_ALPHA == 5.0 and list(cfg.TRAINER.TIP_ADAPTER.SEARCH_SCALE) == [30.0, 30.0]
    assert list(cfg.TRAINER.TIP_ADAPTER.SEARCH_STEP) == [200, 20] and cfg.TRAINER.TIP_ADAPTER.AUGMENT_EPOCH == 10


def test_logits_equal_the_official_formula(tiny_clip):
    torch.manual_seed(0)
    model = _build("tip_adapter", tiny_clip)
    images = torch.randn(5, 3, 32, 32)
    clip_weights = _official_classifier(tiny_clip, NAMES, TEMPLATES)
    # before fit: an empty cache, the zero-shot ensemble times 100
    empty = torch.zeros(clip_weights.shape[0], 0)
    expected = _official_logits(tiny_clip, images, clip_weights, empty, torch.zeros(0, 3), 1.17, 1.0)
    with torch.no_grad():
        assert_close(model(images), expected, ops=clip_ops(tiny_clip))
    # a cache: keys (N, D) normalised, labels
    keys = F.normalize(torch.randn(7, clip_weights.shape[0]), dim=-1)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    model.set_cache(keys, labels)
    model.alpha, model.beta = 2.5, 5.5
    expected = _official_logits(tiny_clip, images, clip_weights, keys.t(), F.one_hot(labels).float(), 2.5, 5.5)
    with torch.no_grad():
        got = model(images)
    assert_close(got, expected, ops=clip_ops(tiny_clip))
    assert not torch.allclose(got, _official_logits(tiny_clip, images, clip_weights, empty, torch.zeros(0, 3), 0, 0),
                              atol=1e-2)


def test_cache_is_the_normalised_mean_of_augmented_raw_features(tiny_clip, data):
    train, val = data
    model = _build("tip_adapter", tiny_clip, AUGMENT_EPOCH=3, CACHE_BATCH_SIZE=5)
    torch.manual_seed(3)
    report = model.build_cache(_ctx(model, train, val))
    assert report == {"augment_epoch": 3, "cache_size": len(train)}
    # the official loop: in order, batches of 5, raw features, mean over passes, then normalise
    from benchmark.transforms import build_train_transform

    torch.manual_seed(3)
    passes, labels = [], []
    dataset = ImageList(train, build_train_transform(model.cfg))
    with torch.no_grad():
        for epoch in range(3):
            feats = []
            for images, target in torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=False):
                feats.append(tiny_clip.encode_image(images))
                if epoch == 0:
                    labels.append(target)
            passes.append(torch.cat(feats).unsqueeze(0))
    keys = torch.cat(passes).mean(dim=0)
    keys /= keys.norm(dim=-1, keepdim=True)
    assert_close(model.cache_keys, keys, ops=clip_ops(tiny_clip) + ops(3, depth=2))  # + the mean, the norm
    assert torch.equal(model.cache_values, F.one_hot(torch.cat(labels)).float())
    assert model.cache_classnames == NAMES
    # the augmentation is the official one: random crops of scale (0.5, 1), flips
    crop = build_train_transform(model.cfg).transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.size == (32, 32)


def test_search_equals_the_official_loop():
    torch.manual_seed(0)
    for trial in range(3):
        d, n, c, m = 8, 12, 4, 30
        text = F.normalize(torch.randn(c, d), dim=-1)
        keys = F.normalize(torch.randn(n, d), dim=-1)
        values = F.one_hot(torch.arange(n) % c, c).float()
        feats = F.normalize(torch.randn(m, d), dim=-1)
        labels = torch.randint(0, c, (m,))
        scale, step = [7.0, 3.0], [40, 10]
        best = search_alpha_beta(feats, labels, text, keys, values, scale, step)
        beta, alpha, acc = _official_search(scale, step, keys.t(), values, feats, labels, text.t())
        # exact: the batched grid and the loop compute every logit with the same operations on the
        # same products, so no prediction can flip between them
        assert (best["beta"], best["alpha"]) == (beta, alpha) and best["accuracy"] == pytest.approx(acc)


def test_search_finds_a_designed_pair():
    """One val image the text gets wrong and the cache gets right: the first (beta, alpha) in
    the official order whose cache term outweighs the text margin wins."""
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feat = F.normalize(torch.tensor([[1.0, 0.98]]), dim=-1)  # text prefers class 0 by a small margin
    keys = torch.cat([feat, torch.tensor([[0.0, -1.0]])])  # an image of class 1 (= the feature), one of class 0
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([1])
    scale, step = [7.0, 3.0], [200, 20]
    best = search_alpha_beta(feat, labels, text, keys, values, scale, step)
    margin = float(100 * feat @ (text[0] - text[1]))
    expected, closest = None, math.inf
    for beta in search_grid(*[scale[0], step[0]]):
        for alpha in search_grid(scale[1], step[1]):
            aff = (feat @ keys.t())[0]
            gain = alpha * (math.exp(-beta * (1 - float(aff[0]))) - math.exp(-beta * (1 - float(aff[1]))))
            closest = min(closest, abs(gain - margin) / margin)
            if gain > margin:
                expected = (beta, alpha)
                break
        if expected:
            break
    # no pair up to the chosen one is within float32 rounding of the margin: the search's float32
    # decisions are the float64 ones here, and the pair can be compared exactly
    assert closest > 1e3 * torch.finfo(torch.float32).eps
    assert expected is not None and (best["beta"], best["alpha"]) == expected and best["accuracy"] == 100.0
    # nothing right anywhere: the official code keeps (0, 0)
    worst = search_alpha_beta(feat, torch.tensor([1]), text, keys[1:], values[1:], scale, step)
    assert (worst["beta"], worst["alpha"]) == (0.0, 0.0)


def test_fit_searches_on_val_only(tiny_clip, data):
    train, val = data
    model = _build("tip_adapter", tiny_clip, AUGMENT_EPOCH=1, SEARCH_STEP=[30, 10], SEARCH_SCALE=[7.0, 3.0])
    torch.manual_seed(0)
    report = model.fit(_ctx(model, train, val))
    assert report["selected_on"] == "val" and report["n_val"] == len(val) and report["searched"]
    # it searched on the val features and the official classifier (up to rounding) ...
    loader = _ctx(model, train, val).test_loader(val)
    feats, labels = [], []
    with torch.no_grad():
        for images, target in loader:
            f = tiny_clip.encode_image(images)
            feats.append(f / f.norm(dim=-1, keepdim=True))
            labels.append(target)
    feats, labels = torch.cat(feats), torch.cat(labels)
    with torch.no_grad():
        used = _ctx(model, train, val).frozen_features(model, val)
        used = used / used.norm(dim=-1, keepdim=True)
    assert_close(used, feats, ops=clip_ops(tiny_clip), what="val features")
    assert_close(model.text_weights.t(), _official_classifier(tiny_clip, NAMES, TEMPLATES), ops=clip_ops(tiny_clip),
                 what="classifier")
    # ... and chose the pair of the official search on them (on the model's own features and
    # classifier: the official ones differ by rounding, which may flip a near-tied prediction)
    beta, alpha, acc = _official_search([7.0, 3.0], [30, 10], model.cache_keys.t(), model.cache_values,
                                        used, labels, model.text_weights.t())
    assert (model.beta, model.alpha) == (beta, alpha) == (report["beta"], report["alpha"])
    assert report["val_accuracy_best"] == pytest.approx(acc)
    assert report["search"]["beta_grid"][2] == 30 and report["search"]["alpha_grid"][2] == 10


def test_no_selection_where_val_is_the_test_set(tiny_clip, data):
    """ImageNet's val is its test set in the harness: nothing is selected on it."""
    train, val = data
    model = _build("tip_adapter", tiny_clip, dataset="imagenet", AUGMENT_EPOCH=1, INIT_ALPHA=1.17)
    assert model.templates == TEMPLATES  # the override wins over the ImageNet ensemble
    report = model.fit(_ctx(model, train, val))
    assert report["selected_on"] is None and "test set" in report["selection_note"]
    assert (model.alpha, model.beta) == (1.17, 1.0) and not report["searched"]
    report = _build("tip_adapter", copy.deepcopy(tiny_clip), AUGMENT_EPOCH=1).fit(_ctx(model, train, []))
    assert report["selected_on"] is None and "no validation" in report["selection_note"]


def test_tip_adapter_f_adapter_init_training_and_selection(tiny_clip, data):
    train, val = data
    epochs = 6
    model = _build("tip_adapter_f", tiny_clip, AUGMENT_EPOCH=1, SEARCH_STEP=[20, 10],
                   **{"OPTIM.MAX_EPOCH": epochs, "OPTIM.LR": 0.01, "DATALOADER.TRAIN_X.BATCH_SIZE": 5})
    assert model.trainable_parameters() == []  # the trainer's loop trains nothing
    ctx = _ctx(model, train, val)
    torch.manual_seed(0)
    model.build_cache(ctx)
    adapter = model.init_adapter()
    assert adapter.bias is None and adapter.in_features == model.cache_keys.shape[1]
    assert adapter.out_features == len(train) and torch.equal(adapter.weight, model.cache_keys)
    assert adapter.weight.data_ptr() != model.cache_keys.data_ptr()

    torch.manual_seed(0)
    report = model.fit(ctx)
    losses = report["epoch_losses"]
    assert len(losses) == epochs and losses[-1] < losses[0]
    steps = math.ceil(len(train) / 5)  # the last, partial batch is kept
    assert report["steps"] == epochs * steps
    # per-iteration cosine over every step, eta_min 0: the lr after each epoch's last step
    for e, lr in enumerate(report["learning_rates"]):
        assert lr == pytest.approx(0.005 * (1 + math.cos(math.pi * (e + 1) / epochs)), abs=1e-9)
    # the best epoch is chosen on val (first strictly best), and its keys are kept
    accs = report["epoch_val_accuracy"]
    assert report["selected_on"] == "val" and report["best_epoch"] == int(np.argmax(accs))
    assert not torch.allclose(model.adapter_weight, model.cache_keys)
    # the logits use the fine-tuned keys in the official formula
    images = torch.randn(4, 3, 32, 32)
    clip_weights = _official_classifier(tiny_clip, NAMES, TEMPLATES)
    expected = _official_logits(tiny_clip, images, clip_weights, model.adapter_weight.t(), model.cache_values,
                                model.alpha, model.beta)
    with torch.no_grad():
        assert_close(model(images), expected, ops=clip_ops(tiny_clip))


def test_novel_classes_get_no_cache_term(tiny_clip):
    torch.manual_seed(0)
    model = _build("tip_adapter", tiny_clip)
    keys = F.normalize(torch.randn(6, model.text_weights.shape[1]), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model.set_cache(keys, labels)
    model.alpha, model.beta = 3.0, 4.0
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        model.set_classnames(["hot-air balloon", "fox", "golden_retriever"])
        after = model(images)
        # shared classes keep their cache term (matched by name), "fox" gets none
        forward = clip_ops(tiny_clip)
        assert_close(after[:, 0], before[:, 2], ops=forward)
        assert_close(after[:, 2], before[:, 0], ops=forward)
        zero_shot = _official_logits(tiny_clip, images, _official_classifier(tiny_clip, ["fox"], TEMPLATES),
                                     torch.zeros(keys.shape[1], 0), torch.zeros(0, 1), 0, 0)
        assert_close(after[:, 1:2], zero_shot, ops=forward)
        # only novel classes: the zero-shot classifier exactly
        model.set_classnames(["fox", "wolf"])
        novel = ["fox", "wolf"]
        expected = _official_logits(tiny_clip, images, _official_classifier(tiny_clip, novel, TEMPLATES),
                                    torch.zeros(keys.shape[1], 0), torch.zeros(0, 2), 0, 0)
        assert_close(model(images), expected, ops=forward)
        model.set_classnames(NAMES)
        assert_close(model(images), before, ops=forward)


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_official_cache_files_round_trip(tiny_clip, tmp_path, name):
    torch.manual_seed(0)
    model = _build(name, tiny_clip)
    d = model.text_weights.shape[1]
    keys = F.normalize(torch.randn(6, d), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    tuned = F.normalize(keys + 0.1 * torch.randn_like(keys), dim=-1) if name == "tip_adapter_f" else None
    model.set_cache(keys, labels, adapter_weight=tuned)
    model.alpha, model.beta = model.options.INIT_ALPHA, model.options.INIT_BETA
    main = model.save_official_file(tmp_path / "caches" / "oxford_pets", shots=2)
    folder = tmp_path / "caches" / "oxford_pets"
    assert main.name == ("best_F_2shots.pt" if name == "tip_adapter_f" else "keys_2shots.pt")
    # the official layouts: keys (D, N), values (N, C) fp16 one-hot, best_F (N, D) parameter
    saved_keys = torch.load(folder / "keys_2shots.pt", weights_only=True)
    saved_values = torch.load(folder / "values_2shots.pt", weights_only=True)
    assert saved_keys.shape == (d, 6) and torch.equal(saved_keys, keys.t())
    assert saved_values.dtype == torch.float16 and torch.equal(saved_values, F.one_hot(labels).half())
    if tuned is not None:
        weight = torch.load(folder / "best_F_2shots.pt", weights_only=True)
        assert isinstance(weight, torch.nn.Parameter) and torch.equal(weight, tuned)
    fresh = _build(name, copy.deepcopy(tiny_clip))
    info = fresh.load_official_file(main)
    assert info["shots"] == 2 and info["cache_size"] == 6
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(fresh(images), model(images), ops=clip_ops(tiny_clip))
    # the directory alone works too
    again = _build(name, copy.deepcopy(tiny_clip))
    again.load_official_file(folder)
    with torch.no_grad():
        assert_close(again(images), model(images), ops=clip_ops(tiny_clip))


def test_files_written_as_the_official_code_writes_them(tiny_clip, tmp_path):
    """keys = normalised mean, permuted to (D, N); values = one_hot(labels).half();
    best_F = the adapter's Parameter, a transposed view of the keys."""
    torch.manual_seed(1)
    model = _build("tip_adapter_f", tiny_clip)
    d = model.text_weights.shape[1]
    raw = torch.randn(3, 6, d)  # three augmented passes
    cache_keys = raw.mean(dim=0)
    cache_keys /= cache_keys.norm(dim=-1, keepdim=True)
    cache_keys = cache_keys.permute(1, 0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.save(cache_keys, tmp_path / "keys_16shots.pt")
    torch.save(F.one_hot(labels).half(), tmp_path / "values_16shots.pt")
    adapter = torch.nn.Linear(cache_keys.shape[0], cache_keys.shape[1], bias=False)
    adapter.weight = torch.nn.Parameter(cache_keys.t())
    with torch.no_grad():
        adapter.weight.add_(0.05)
    torch.save(adapter.weight, tmp_path / "best_F_16shots.pt")
    model.load_official_file(tmp_path / "best_F_16shots.pt")
    assert torch.allclose(model.adapter_weight, adapter.weight.detach())
    images = torch.randn(2, 3, 32, 32)
    expected = _official_logits(tiny_clip, images, _official_classifier(tiny_clip, NAMES, TEMPLATES),
                                adapter.weight.detach().t(), F.one_hot(labels).float(), 1.17, 1.0)
    with torch.no_grad():
        assert_close(model(images), expected, ops=clip_ops(tiny_clip))


def test_harness_checkpoint_restores_the_fitted_cache(tiny_clip, data, tmp_path):
    from benchmark import checkpoint

    train, val = data
    model = _build("tip_adapter", tiny_clip, AUGMENT_EPOCH=1, SEARCH_STEP=[10, 5])
    torch.manual_seed(0)
    model.fit(_ctx(model, train, val))
    path = checkpoint.save(model, tmp_path / "run.pt")
    fresh = _build("tip_adapter", copy.deepcopy(tiny_clip))
    checkpoint.load(fresh, path)
    assert (fresh.alpha, fresh.beta, fresh.cache_classnames) == (model.alpha, model.beta, NAMES)
    assert_restored(fresh, model, torch.randn(3, 3, 32, 32), ops=clip_ops(tiny_clip))


def test_half_precision_keeps_the_official_dtypes(tiny_clip, data):
    """PREC fp16 (the released half-precision CLIP): classifier, keys, values and the
    fine-tuned keys are fp16, and AdamW updates the fp16 adapter directly."""
    from benchmark.precision import cast_clip

    train, val = data
    clip = cast_clip(tiny_clip, "fp16")
    model = _build("tip_adapter_f", clip, AUGMENT_EPOCH=1, SEARCH_STEP=[10, 5],
                   **{"OPTIM.MAX_EPOCH": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 5})
    torch.manual_seed(0)
    report = model.fit(FitContext(train, val, model.cfg, torch.device("cpu"), "fp16"))
    assert all(math.isfinite(x) for x in report["epoch_losses"])
    for tensor in (model.text_weights, model.cache_keys, model.cache_values, model.adapter_weight):
        assert tensor.dtype == torch.float16
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
