"""Linear-probe CLIP on the tiny CLIP and synthetic datasets on disk: the features, the
official regularisation search (against a line-by-line re-implementation of the official
script), torch logits against scikit-learn's predictions, class names, our checkpoint
format, and a whole run through the trainer (novel classes: not applicable)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tolerance import assert_close, assert_restored, clip_ops, decisive, ops

import benchmark
import methods.linear_probe  # noqa: F401  (registers "linear_probe")
from benchmark import loaders, trainer
from benchmark.loaders import eval_inputs
from benchmark.protocols import base2novel
from datasets.build import build_dataset
from datasets.synthetic import write_synthetic_dataset, write_synthetic_root
from methods.linear_probe import INITIAL_C, search_c
from methods.registry import ClassesNotSupported, MethodError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny fits spend their time waking threads on a busy machine; one thread gives the
    same numbers (the solver's reductions do not depend on the thread count) faster."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("lp")
    write_synthetic_root(path, ["eurosat", "imagenet"])  # eurosat: 10 classes, 8/2/4 per class
    return path


def _cfg(root, dataset="eurosat", shots=2, seed=1, subsample="all"):
    cfg = benchmark.make_config("linear_probe", dataset, **{
        "INPUT.SIZE": (32, 32), "DATASET.ROOT": str(root), "DATASET.NUM_SHOTS": shots,
        "DATASET.SUBSAMPLE_CLASSES": subsample, "DATALOADER.NUM_WORKERS": 0})
    cfg.SEED = seed
    cfg.freeze()
    return cfg


def _fitted(tiny_clip, root, **kw):
    cfg = _cfg(root, **kw)
    data = build_dataset(cfg.DATASET.NAME, root, num_shots=cfg.DATASET.NUM_SHOTS, seed=cfg.SEED,
                         subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
    model = benchmark.build("linear_probe", data.classnames, clip=tiny_clip)
    ctx = trainer.FitContext(data.train, data.val, cfg, torch.device("cpu"), "fp32")
    report = model.fit(ctx)
    return model, data, report


def _features(clip, items):
    """Independent extraction as the official extractor does it: the test transform
    (resize the short side, centre crop, CLIP normalisation), the image tower's output
    as it is (no L2 normalisation), stored as float64."""
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                    T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    images = torch.stack([tf(Image.open(d.impath).convert("RGB")) for d in items])
    with torch.no_grad():
        feats = clip.visual(images)
    return feats.double().numpy(), np.array([d.label for d in items])


def _logits(model, items, cfg):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images) for images, _ in loaders.test_loader(items, cfg, torch.device("cpu"))])


def _official_search(train_x, train_y, val_x, val_y, num_step=8):
    """The official lpclip/linear_probe.py search, written out the way the script runs it:
    every fit redone, the initial list, np.argmax, then num_step steps in log10 space."""
    def fit(c):
        return LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(train_x, train_y)

    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = []
    for c_weight in search_list:
        pred = fit(c_weight).predict(val_x)
        acc_list.append(sum(pred == val_y) / len(val_y))
    c_peak = search_list[np.argmax(acc_list)]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    steps, clf_final = [], None
    for _ in range(num_step):
        clf_left, clf_right = fit(c_left), fit(c_right)
        acc_left = sum(clf_left.predict(val_x) == val_y) / len(val_y)
        acc_right = sum(clf_right.predict(val_x) == val_y) / len(val_y)
        if acc_left < acc_right:
            c_final, clf_final = c_right, clf_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final, clf_final = c_left, clf_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        steps.append((c_final, acc_left, acc_right))
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return acc_list, steps, c_final, clf_final


def _steps(trace):
    return [(s["chosen"], s["acc_left"], s["acc_right"]) for s in trace["steps"]]


# -- the official search -----------------------------------------------------------------------------
def test_search_matches_the_official_script_on_designed_features():
    """Gaussian classes with few shots: accuracy moves with C, so the search takes both
    branches; every step, the chosen C and the final weights equal the script's."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12))
    train_y, val_y = np.repeat(np.arange(6), 2), np.repeat(np.arange(6), 8)
    train_x = centres[train_y] + 2.0 * rng.normal(size=(12, 12))
    val_x = centres[val_y] + 2.0 * rng.normal(size=(48, 12))
    ref_accs, ref_steps, ref_c, ref_clf = _official_search(train_x, train_y, val_x, val_y)
    c, clf, trace = search_c(train_x, train_y, val_x, val_y)
    # exact: both fit the same float64 arrays with the same solver in this process (bit identity of
    # the search is the claim)
    assert [a for _, a in trace["initial"]] == ref_accs
    assert [c0 for c0, _ in trace["initial"]] == list(INITIAL_C)
    assert _steps(trace) == ref_steps and len(ref_steps) == 8
    assert c == ref_c
    assert np.array_equal(clf.coef_, ref_clf.coef_) and np.array_equal(clf.intercept_, ref_clf.intercept_)
    # both branches of the search happen on these features (else the test proves less)
    lefts = {s["chosen"] == s["left"] for s in trace["steps"]}
    assert lefts == {True, False}


def test_ties_go_to_the_largest_initial_c_and_to_the_left_end():
    """All validation accuracies equal: np.argmax keeps 1e6, every step keeps the left end."""
    x = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # each point in both classes
    y = np.array([0, 1, 0, 1])
    c, _, trace = search_c(x, y, x, y)
    assert trace["peak"] == 1e6
    assert all(s["chosen"] == s["left"] for s in trace["steps"])
    assert trace["steps"][0]["left"] == 1e-1 * 1e6 and trace["steps"][0]["right"] == 1e1 * 1e6
    assert c == _official_search(x, y, x, y)[2]


def test_fit_on_real_images_follows_the_official_pipeline(tiny_clip, root):
    """Through FitContext on images on disk: features from the test transform without
    normalisation; the search is the official one on those features; the final model is
    fitted on the train images only with the last step's C."""
    model, data, report = _fitted(tiny_clip, root, shots=2)
    ctx = trainer.FitContext(data.train, data.val, _cfg(root, shots=2), torch.device("cpu"), "fp32")
    train_x, train_y = model.extract(ctx, data.train)
    val_x, val_y = model.extract(ctx, data.val)
    assert len(train_y) == 2 * 10 and len(val_y) == 2 * 10  # K and min(K, 4) per class
    # the features are the official extractor's, up to the float32 tower's rounding ...
    for x, y, items in ((train_x, train_y, data.train), (val_x, val_y, data.val)):
        ref_x, ref_y = _features(tiny_clip, items)
        assert_close(torch.as_tensor(x).float(), torch.as_tensor(ref_x).float(), ops=clip_ops(tiny_clip))
        assert np.array_equal(y, ref_y)
    # ... and the search is the official script's on them (the same features on both sides: the
    # same fits, so every accuracy and choice agrees exactly; features off by rounding could flip a
    # near-tied validation prediction)
    ref_accs, ref_steps, ref_c, ref_clf = _official_search(train_x, train_y, val_x, val_y)
    assert [a for _, a in report["search"]["initial"]] == pytest.approx(ref_accs)
    assert [(c, pytest.approx(a), pytest.approx(b)) for c, a, b in ref_steps] == _steps(report["search"])
    assert report["C"] == ref_c and report["selected_on"] == "val" and report["val_source"] == "val"
    _, acc_left, acc_right = ref_steps[-1]  # the last step's kept end is the final model
    assert report["search"]["final_acc"] == pytest.approx(acc_right if acc_left < acc_right else acc_left)
    assert report["val_accuracy"] == pytest.approx(100 * report["search"]["final_acc"])
    assert report["n_train"] == 20 and report["n_val"] == 20
    assert torch.allclose(model.head.weight, torch.as_tensor(ref_clf.coef_), atol=1e-6)
    assert torch.allclose(model.head.bias, torch.as_tensor(ref_clf.intercept_), atol=1e-6)


def test_torch_logits_give_sklearn_predictions(tiny_clip, root):
    model, data, report = _fitted(tiny_clip, root, shots=4, seed=2)
    cfg = _cfg(root, shots=4, seed=2)
    ctx = trainer.FitContext(data.train, data.val, cfg, torch.device("cpu"), "fp32")
    train_x, train_y = model.extract(ctx, data.train)  # the features the head was fitted on
    clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=report["C"]).fit(train_x, train_y)
    test_x, test_y = model.extract(ctx, data.test)
    logits = _logits(model, data.test, cfg)
    assert logits.shape == (len(data.test), 10) and logits.dtype == torch.float64
    # the same float64 features on both sides: one product of length D and the bias, in float64
    head = dict(ops=ops(test_x.shape[1], depth=2), scale=logits.abs().max().item())
    assert_close(logits, torch.as_tensor(clf.decision_function(test_x)), **head)
    # no test image is within rounding of a tie here, so the predictions must agree
    assert decisive(logits, **head).all()
    assert np.array_equal(logits.argmax(-1).numpy(), clf.predict(test_x))
    # and the trainer's own evaluation path gives the accuracy of those predictions
    metrics = trainer.evaluate(model, data.test, eval_inputs(model, cfg, torch.device("cpu")), "fp32")
    assert metrics["accuracy"] == pytest.approx(100 * np.mean(clf.predict(test_x) == test_y))


def test_two_classes_give_the_binary_model_decision(tiny_clip, tmp_path):
    """Two classes make scikit-learn fit one weight row; the torch head still predicts as it does."""
    write_synthetic_dataset("eurosat", tmp_path, n_classes=4)
    model, data, report = _fitted(tiny_clip, tmp_path, shots=2, subsample="base")
    assert data.classnames == model.classnames and len(model.classnames) == 2
    cfg = _cfg(tmp_path, shots=2, subsample="base")
    ctx = trainer.FitContext(data.train, data.val, cfg, torch.device("cpu"), "fp32")
    train_x, train_y = model.extract(ctx, data.train)  # the features the head was fitted on
    clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=report["C"]).fit(train_x, train_y)
    assert clf.coef_.shape[0] == 1
    test_x, _ = model.extract(ctx, data.test)
    logits = _logits(model, data.test, cfg)
    # a difference of two logits: the errors are relative to the logits, not to the difference
    head = dict(ops=ops(test_x.shape[1], depth=3), scale=logits.abs().max().item())
    assert_close(logits[:, 1] - logits[:, 0], torch.as_tensor(clf.decision_function(test_x)), **head)
    keep = decisive(logits, **head).numpy()  # predictions that rounding cannot flip
    assert keep.any() and np.array_equal(logits.argmax(-1).numpy()[keep], clf.predict(test_x)[keep])


def test_val_with_fewer_images_than_asked_is_used_as_it_is(tiny_clip, root):
    """8 shots ask for min(8, 4) = 4 validation images per class; the dataset has 2: the
    search runs on those 2 (the harness's draw keeps every image of a small class)."""
    _, data, report = _fitted(tiny_clip, root, shots=8)
    assert report["n_val"] == len(data.val) == 20 and report["val_per_class_min"] == 2


def test_imagenet_chooses_c_on_held_out_training_images(tiny_clip, root):
    """ImageNet's val is its test set: C is chosen on min(K, 4) training images per class
    that are outside the few-shot set, never on test images."""
    cfg = _cfg(root, dataset="imagenet", shots=2)
    data = build_dataset("imagenet", root, num_shots=2, seed=1)
    assert data.val == data.test  # what the trainer hands a method for ImageNet
    model = benchmark.build("linear_probe", data.classnames, clip=tiny_clip, dataset="imagenet", shots=2)
    ctx = trainer.FitContext(data.train, data.val, cfg, torch.device("cpu"), "fp32", seed=1,
                             full_train=lambda: build_dataset("imagenet", root).train)
    held_out, source = model._validation_data(ctx)
    assert source == "train_heldout"
    test_paths, train_paths = {d.impath for d in data.test}, {d.impath for d in data.train}
    all_train = {d.impath for d in build_dataset("imagenet", root).train}
    assert all(d.impath in all_train and d.impath not in train_paths | test_paths for d in held_out)
    assert np.bincount([d.label for d in held_out]).tolist() == [2] * len(data.classnames)
    report = model.fit(ctx)
    assert report["selected_on"] == "val" and report["val_source"] == "train_heldout"
    assert report["n_val"] == 2 * len(data.classnames)


# -- class names, before and after fitting ---------------------------------------------------------
def test_class_names_before_and_after_fit(tiny_clip, root):
    images = torch.randn(5, 3, 32, 32)
    model = benchmark.build("linear_probe", ["a", "b", "c"], clip=tiny_clip)
    with torch.no_grad():  # an all-zero head gives exact zeros
        assert torch.equal(model(images), torch.zeros(5, 3, dtype=torch.float64))
    model.set_classnames(["x", "y"])  # nothing fitted yet: any names
    with torch.no_grad():
        assert model(images).shape == (5, 2)

    model, data, _ = _fitted(tiny_clip, root, shots=1)
    names = list(data.classnames)
    model.eval()
    with torch.no_grad():
        full = model(images)
        head = ops(model.head.weight.shape[1], depth=2)  # the float64 head on the same features
        order = [3, 0, 9, 1, 2, 8, 7, 4, 5, 6]
        model.set_classnames([names[i] for i in order])  # same classes, other order: rows follow
        assert_close(model(images), full[:, order], ops=head)
        model.set_classnames([names[4], names[2]])  # a subset: its rows
        assert_close(model(images), full[:, [4, 2]], ops=head)
        with pytest.raises(ClassesNotSupported, match="new to it"):
            model.set_classnames(names[:5] + ["a class never seen"])
        assert model.classnames == [names[4], names[2]]  # a refused change leaves the model as it was
        model.set_classnames(names)
        assert_close(model(images), full, ops=head)


def test_no_validation_images_is_an_error(tiny_clip, root):
    cfg = _cfg(root, shots=1)
    data = build_dataset("eurosat", root, num_shots=1, seed=1)
    model = benchmark.build("linear_probe", data.classnames, clip=tiny_clip)
    with pytest.raises(MethodError, match="no validation images"):
        model.fit(trainer.FitContext(data.train, [], cfg, torch.device("cpu"), "fp32"))


# -- our checkpoint format -----------------------------------------------------------------------------
def test_checkpoint_round_trip(tiny_clip, root, tmp_path):
    """The official code saves no model; ours is head's state dict (weight, bias) in the
    toolbox's checkpoint layout, for the class names it was fitted on."""
    model, data, _ = _fitted(tiny_clip, root, shots=2)
    path = benchmark.save_official_checkpoint(model, tmp_path / "head" / "model.pth.tar-0", 0)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert set(saved) == {"weight", "bias"} and saved["weight"].shape == (10, tiny_clip.visual.output_dim)
    fresh = benchmark.build("linear_probe", data.classnames, clip=tiny_clip)
    benchmark.load_official_checkpoint(fresh, path)
    images = torch.randn(4, 3, 32, 32)
    model.eval(), fresh.eval()
    head = ops(tiny_clip.visual.output_dim, depth=2)  # the float64 head on the same features
    assert_restored(fresh, model, images, ops=head)
    with pytest.raises(ClassesNotSupported):  # loaded weights count as fitted
        fresh.set_classnames(["a class never seen"])
    other = benchmark.build("linear_probe", data.classnames[:3], clip=tiny_clip)
    with pytest.raises(MethodError, match="shape mismatch"):
        benchmark.load_official_checkpoint(other, path)
    # the harness's own checkpoints (--save-checkpoints, the transfer run) carry the names too
    from benchmark import checkpoint

    checkpoint.save(model, tmp_path / "run.pt")
    checkpoint.load(other, tmp_path / "run.pt")
    assert other.classnames == data.classnames
    other.eval()
    assert_restored(other, model, images, ops=head)
    other.set_classnames(data.classnames[::-1])  # counts as fitted: its rows follow the names
    with pytest.raises(ClassesNotSupported):
        other.set_classnames(["a class never seen"])


def test_config_holds_the_official_settings():
    cfg = benchmark.make_config("linear_probe")
    opts = cfg.TRAINER.LINEAR_PROBE
    assert list(opts.C_INIT) == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    assert opts.SEARCH_STEPS == 8 and opts.MAX_ITER == 1000 and opts.PREC == "fp16"
    assert cfg.DATALOADER.TEST.BATCH_SIZE == 200 and cfg.INPUT.INTERPOLATION == "bicubic"


# -- a whole run ------------------------------------------------------------------------------------------
def test_run_records_the_fit_and_novel_as_not_applicable(root):
    spec, = base2novel(["linear_probe"], ["eurosat"], [1], [2], root=str(root), backbone="tiny-clip-12",
                       backbone_id="tiny-clip-12", user_yaml=None, opts=["DATALOADER.NUM_WORKERS", "0"])
    record = trainer.execute(spec, device="cpu")
    assert record["status"] == "ok"
    base, novel = record["metrics"]["base"], record["metrics"]["novel"]
    assert 0 <= base["accuracy"] <= 100 and base["n_classes"] == 5
    assert novel["status"] == "not_applicable" and "linear probe" in novel["reason"]
    fit = record["train"]["fit"]
    assert fit["selected_on"] == "val" and fit["C"] > 0 and len(fit["search"]["steps"]) == 8
    assert record["compute"]["trainable_params"] == 0 and record["train"]["steps"] == 0
    assert not math.isnan(base["accuracy"])
