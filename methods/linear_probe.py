"""Linear-probe CLIP: logistic regression on frozen CLIP image features.

The few-shot baseline of "Learning to Prompt for Vision-Language Models" (IJCV 2022,
arXiv 2109.01134), as the official code base runs it (``lpclip/feat_extractor.py`` and
``lpclip/linear_probe.py``):

* features are the image encoder's output (after its projection), **not** L2-normalised,
  extracted through the *test* transform (resize, centre crop, normalise) for the train,
  val and test images alike, with the released half-precision CLIP on a GPU;
* the classifier is scikit-learn's ``LogisticRegression`` with the lbfgs solver, an L2
  penalty and ``max_iter=1000``, fitted on the few-shot train features only;
* its inverse regularisation strength C is chosen on the few-shot validation features
  (``min(K, 4)`` images per class): first the list 1e6, 1e4, ..., 1e-6 (the first best
  wins a tie, i.e. the largest C), then 8 steps of a search in log10 space that starts at
  [C*/10, 10 C*], fits both ends, keeps the better (the left end unless the right one is
  strictly better) and halves the interval towards it; the model of the **last** step is
  the final one (not the best one seen over the search);
* validation accuracy is correct / total over the validation images.

Deviations, both forced by the harness:

* the few-shot train/val images are the harness's draw (the one every method shares, the
  official dataset sampler, ``K`` and ``min(K, 4)`` per class) instead of the script's own
  numpy draw from features of the full splits; the counts per class are the same;
* ImageNet has no validation split (its "val" is the test set, which the official
  script samples from); here C is never chosen on test images: ``min(K, 4)`` images per
  class are drawn instead from ImageNet's training images outside the few-shot set.

The fitted weights live in ``head`` (buffers ``weight`` and ``bias``, float64 so that
the logits give scikit-learn's predictions exactly).  The official code saves no model;
``benchmark.save_official_checkpoint`` writes ``head``'s state dict and
``load_official_checkpoint`` reads it back for the same class names.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict, deque
from typing import Sequence

import numpy as np
import torch
from torch import nn

from methods.registry import ClassesNotSupported, Method, MethodError, register_method

log = logging.getLogger(__name__)

# the official initial list of C values, tried in this order (ties go to the earlier one)
INITIAL_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
SEARCH_STEPS = 8  # the official script's --num_step (linear_probe.sh passes 8)
MAX_ITER = 1000


# -- the official search ------------------------------------------------------------------
def fit_logistic(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = MAX_ITER):
    """The official classifier: lbfgs, L2 penalty (the default), ``max_iter`` iterations."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(features, labels)
    clf.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf


def accuracy(clf, features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of correct predictions (the official ``sum(pred == y) / len(y)``)."""
    return float(np.sum(clf.predict(features) == labels) / len(labels))


def search_c(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             initial: Sequence[float] = INITIAL_C, steps: int = SEARCH_STEPS,
             max_iter: int = MAX_ITER):
    """The official regularisation search; returns (C, classifier, trace).

    The trace holds the accuracies as the official script computes them (fractions in
    [0, 1]): the initial list, then each step's two ends and the C it kept; ``final_acc``
    is the validation accuracy of the returned classifier.  A C value that comes back (the kept end of an interval is re-fitted at the next step)
    is fitted once: lbfgs is deterministic, so this only saves time.
    """
    fitted: dict[float, tuple[object, float]] = {}

    def evaluate(c: float):
        key = float(c)
        if key not in fitted:
            clf = fit_logistic(train_x, train_y, key, max_iter)
            fitted[key] = (clf, accuracy(clf, val_x, val_y))
        return fitted[key]

    accs = [evaluate(c)[1] for c in initial]
    peak = list(initial)[int(np.argmax(accs))]  # first maximum
    trace = {"initial": [[float(c), a] for c, a in zip(initial, accs)], "peak": float(peak), "steps": []}
    chosen, (clf, acc) = float(peak), evaluate(peak)
    c_left, c_right = 1e-1 * peak, 1e1 * peak
    for _ in range(steps):
        clf_left, acc_left = evaluate(c_left)
        clf_right, acc_right = evaluate(c_right)
        if acc_left < acc_right:  # strictly better on the right; a tie keeps the left end
            chosen, clf, acc = float(c_right), clf_right, acc_right
            low, high = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_right)
        else:
            chosen, clf, acc = float(c_left), clf_left, acc_left
            low, high = np.log10(c_left), 0.5 * (np.log10(c_right) + np.log10(c_left))
        trace["steps"].append({"left": float(c_left), "right": float(c_right), "acc_left": acc_left,
                               "acc_right": acc_right, "chosen": chosen})
        # the official code hands the next range back as powers of ten of these logs
        c_left, c_right = np.power(10, low), np.power(10, high)
    trace["final_acc"] = acc
    trace["n_fits"] = len(fitted)
    trace["not_converged"] = sorted(c for c, (m, _) in fitted.items() if not m.converged_)
    return chosen, clf, trace


# -- the model --------------------------------------------------------------------------------
class LinearHead(nn.Module):
    """A fixed linear layer (no parameters): logits = features @ weight.T + bias, in float64."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_classes, dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(n_classes, dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float64 is outside autocast's reach, so this runs as written under every precision
        return features.to(self.weight.dtype) @ self.weight.t() + self.bias


@register_method(
    "linear_probe", node="LINEAR_PROBE",
    defaults=dict(PREC="fp16", C_INIT=list(INITIAL_C), SEARCH_STEPS=SEARCH_STEPS, MAX_ITER=MAX_ITER),
    paper="Learning to Prompt for Vision-Language Models (IJCV 2022)", paper_name="Linear probe CLIP",
    code="the CoOp code base, lpclip/feat_extractor.py and lpclip/linear_probe.py")
class LinearProbeCLIP(Method):
    frozen_image_features = True
    trainable = ()  # nothing trains by gradient; ``fit`` solves for the head
    official_module = "head"  # no official format exists: this is the harness's own

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        self.dim = int(clip.visual.output_dim)
        self.head = LinearHead(len(classnames), self.dim)
        self._fitted: tuple[list[str], torch.Tensor, torch.Tensor] | None = None

    # -- features and logits -----------------------------------------------------------
    # the official extractor takes the image tower's output as it is (no normalisation)
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_features(images))

    def extract(self, ctx, data) -> tuple[np.ndarray, np.ndarray]:
        """Features (float64, as the official script stores them) and labels of test-transformed images."""
        if not data:
            return np.zeros((0, self.dim)), np.zeros(0, dtype=np.int64)
        features = ctx.frozen_features(self, data).double().cpu().numpy()
        return features, np.array([d.label for d in data], dtype=np.int64)

    # -- fitting -------------------------------------------------------------------------
    def fit(self, ctx) -> dict:
        opts = self.options
        self.eval()
        train_x, train_y = self.extract(ctx, ctx.train)
        val_data, val_source = self._validation_data(ctx)
        val_x, val_y = self.extract(ctx, val_data)
        if len(val_y) == 0:
            raise MethodError("The linear probe chooses its regularisation on the validation split, "
                              "but this dataset has no validation images.")
        missing = sorted(set(range(len(self.classnames))) - set(train_y.tolist()))
        if missing:
            raise MethodError(f"The linear probe needs training images of every class; none for "
                              f"{[self.classnames[i] for i in missing[:5]]}.")
        per_class = np.bincount(val_y, minlength=len(self.classnames))
        shots = int(self.dataset.shots)
        wanted = min(shots, 4) if shots >= 1 else None
        if wanted is not None and per_class.min() < wanted:
            # the official numpy draw would stop here; the harness keeps what the dataset has
            log.warning("Validation has fewer than %d images for %d classes; searching C on %d images.",
                        wanted, int((per_class < wanted).sum()), len(val_y))

        import sklearn

        c, clf, trace = search_c(train_x, train_y, val_x, val_y, [float(v) for v in opts.C_INIT],
                                 int(opts.SEARCH_STEPS), int(opts.MAX_ITER))
        self._set_fitted(clf)
        log.info("linear probe: C = %g (val accuracy %.2f%%, %d fits)", c, 100 * trace["final_acc"],
                 trace["n_fits"])
        return {
            "C": c,
            "selected_on": "val",
            "val_source": val_source,
            "val_accuracy": 100.0 * trace["final_acc"],  # percent
            "n_train": int(len(train_y)),
            "n_val": int(len(val_y)),
            "val_per_class_min": int(per_class.min()),
            "search": trace,
            "sklearn": sklearn.__version__,
        }

    def _validation_data(self, ctx):
        """The few-shot validation images; for a dataset whose "val" is its test set
        (ImageNet), ``min(K, 4)`` per class drawn from the training images outside the
        few-shot set instead, so that no test image takes part in the choice of C."""
        if not self.dataset.val_is_test:
            return list(ctx.val), "val"
        shots = int(self.dataset.shots)
        held_out = ctx.held_out_train(min(shots, 4) if shots >= 1 else 4)
        if not held_out:
            raise MethodError(f"{self.dataset.name} has no validation split and no training images outside the "
                              f"few-shot set to choose the linear probe's C on.")
        return held_out, "train_heldout"

    @torch.no_grad()
    def _set_fitted(self, clf) -> None:
        n = len(self.classnames)
        classes = [int(k) for k in clf.classes_]
        coef = torch.as_tensor(np.asarray(clf.coef_), dtype=torch.float64)
        intercept = torch.as_tensor(np.asarray(clf.intercept_), dtype=torch.float64)
        weight = torch.zeros(n, self.dim, dtype=torch.float64)
        bias = torch.zeros(n, dtype=torch.float64)
        if len(classes) == 2:
            # a binary model has one row w (predicts classes_[1] when w.x + b > 0); the
            # rows [0, w] give that decision, and a tie at 0 goes to classes_[0] as well
            weight[classes[1]], bias[classes[1]] = coef[0], intercept[0]
        else:
            weight[classes], bias[classes] = coef, intercept
        self._fitted = (list(self.classnames), weight, bias)
        self._use_rows(list(range(n)))

    def _use_rows(self, rows: list[int]) -> None:
        _, weight, bias = self._fitted
        device = self.head.weight.device
        self.head.weight = weight[rows].to(device)
        self.head.bias = bias[rows].to(device)

    # -- class names ---------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Before ``fit``: any names (an all-zero head).  After: the fitted classes in any
        order or a subset of them (their rows); a class never fitted cannot be scored."""
        names = list(classnames)
        if self._fitted is None:
            self.classnames = names
            device = self.head.weight.device
            self.head.weight = torch.zeros(len(names), self.dim, dtype=torch.float64, device=device)
            self.head.bias = torch.zeros(len(names), dtype=torch.float64, device=device)
            return
        fitted_names = self._fitted[0]
        slots: dict[str, deque] = defaultdict(deque)
        for i, name in enumerate(fitted_names):
            slots[name].append(i)
        rows, unseen = [], []
        for name in names:
            if slots[name]:
                rows.append(slots[name].popleft())
            else:
                unseen.append(name)
        if unseen:
            raise ClassesNotSupported(
                f"A linear probe has weights only for the {len(fitted_names)} classes it was fitted on; "
                f"{len(unseen)} of the {len(names)} requested classes are new to it "
                f"(e.g. {', '.join(repr(u) for u in unseen[:3])}).")
        self.classnames = names
        self._use_rows(rows)

    # -- our own checkpoints -------------------------------------------------------------
    def on_weights_loaded(self) -> None:
        # a loaded head holds fitted rows for the current class names
        self._fitted = (list(self.classnames), self.head.weight.detach().cpu().clone(),
                        self.head.bias.detach().cpu().clone())
