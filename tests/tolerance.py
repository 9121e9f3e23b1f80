"""Tolerances for floating-point results that are computed in different orders.

The rule
--------
Two computations of the same quantity that differ only in the order of their floating-point
operations (another kernel, vector width or thread count; a batched instead of a looped
formula; the model's code against an independent re-implementation of the same equations)
agree up to rounding, and nothing else.  Each rounding has a relative error of at most
``eps / 2`` (``eps``: the machine epsilon of the dtype compared, 1.2e-7 for float32,
2.2e-16 for float64), relative to the magnitudes that flow through the computation, not to
one output element: an element near zero that results from cancelling terms keeps an
absolute error of the size of those terms.  So an element may be off by

    ops * eps * (scale + |expected element|)        i.e. rtol = ops * eps, atol = rtol * scale

where

* ``scale`` is the largest magnitude of the expected tensor (standing for the magnitudes of
  the intermediate values); ``scale=0`` makes the bound purely elementwise, right for
  elementwise arithmetic without cancellation;
* ``ops`` estimates how many roundings pile up in one element: ``depth * sqrt(length)`` for
  ``depth`` sequential stages (layers, a backward pass after the forward one) that each reduce
  over at most ``length`` terms.  Inside one reduction independent roundings add up like a
  random walk (``sqrt(length)``); across stages they are added linearly, which over-counts by
  about ``sqrt(depth)`` and is the margin for kernels other than the ones measured here.

The bound is relative to the data, so it tightens with float64 (where a test is about the
exactness of an equation, running both sides in float64 makes a tight bound honest) and it
still fails on a real bug: a wrong factor or a missing term moves the result by far more than
``ops * eps`` of its scale.

What is compared exactly (``torch.equal``, ``==``), not with this module: integers (token ids,
labels, counts), tensors loaded back from a file against what was saved, copies of one tensor,
random-number states, and results whose bit identity is itself the claim, where both sides run
the same operations on the same shapes in one process (a test says so in a comment).  Nothing
computed twice by different code, or for inputs of another shape, is bit-identical on every
machine: other kernels, vector widths and thread counts (``.ci/kernels`` runs the tests under a
second set) and even whether a weight requires gradients choose other paths.  A checkpoint round
trip compares the restored tensors exactly and the outputs with this rule (``assert_restored``).
Predictions (an argmax) of two computations are compared only where no score is within rounding
of the best one: otherwise they may flip.
"""

from __future__ import annotations

import math

import pytest
import torch


def ops(length: int = 1, depth: int = 1) -> float:
    """The rounding budget of ``depth`` sequential stages, each reducing over at most ``length`` terms."""
    return depth * math.sqrt(max(length, 1))


def clip_ops(clip: torch.nn.Module, passes: int = 1) -> float:
    """The rounding budget of one pass through a CLIP (``passes=2``: forward and backward).

    Stages: the blocks of the deeper tower plus two (the embedding / patch stem before them;
    the final norm, projection, normalisation and logits after them).  Length: the longest
    reduction of a stage, the MLP's hidden width, the attention's sequence or the patch stem.
    """
    towers = (clip.transformer, clip.visual.transformer)
    depth = max(len(t.resblocks) for t in towers) + 2
    length = max(*(t.resblocks[0].mlp.c_proj.in_features for t in towers), clip.visual.conv1.weight[0].numel(),
                 clip.positional_embedding.shape[0], clip.visual.positional_embedding.shape[0])
    return passes * ops(length, depth)


def tolerance(expected: torch.Tensor, *, ops: float, scale: float | None = None,
              dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(rtol, atol) for a result computed in another order than ``expected``: ``ops`` roundings
    of ``dtype`` (default: ``expected``'s) relative to ``scale`` (default: ``max |expected|``)."""
    rtol = ops * torch.finfo(dtype or expected.dtype).eps
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return rtol, rtol * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, ops: float, scale: float | None = None,
                 what: str = "") -> None:
    """``actual`` equals ``expected`` up to the rule's bound, in the less precise dtype of the two."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = max(actual.dtype, expected.dtype, key=lambda d: torch.finfo(d).eps)
    rtol, atol = tolerance(expected, ops=ops, scale=scale, dtype=dtype)
    a, e = actual.double(), expected.double()
    if bool((a - e).abs().le(atol + rtol * e.abs()).all()):
        return
    err, eps = (a - e).abs().max().item(), torch.finfo(dtype).eps
    raise AssertionError(f"{what or 'tensors'}: differ by up to {err:.3g}, allowed atol {atol:.3g} + rtol {rtol:.3g} "
                         f"({ops:.1f} roundings of {dtype} (eps {eps:.3g}) relative to the scale "
                         f"{atol / rtol if rtol else 0.0:.3g})")


def approx(expected, *, ops: float, dtype: torch.dtype = torch.float32, scale: float | None = None):
    """``pytest.approx`` for Python numbers that come out of ``dtype`` computations, with the rule's bounds."""
    values = [expected] if isinstance(expected, (int, float)) else list(expected)
    rtol = ops * torch.finfo(dtype).eps
    atol = rtol * (max((abs(v) for v in values), default=0.0) if scale is None else scale)
    return pytest.approx(expected, rel=rtol, abs=atol)


def logit_scale(clip: torch.nn.Module) -> float:
    """The ``scale`` of cosine logits ``s * <u, v>`` (unit ``u``, ``v``): their terms add up to at
    most ``s`` in magnitude, so their roundings are relative to ``s``, not to a logit that the
    terms cancel down to."""
    return float(clip.logit_scale.detach().exp())


def assert_restored(restored: torch.nn.Module, trained: torch.nn.Module, inputs: torch.Tensor, *, ops: float,
                    scale: float | None = None, what: str = "restored model") -> None:
    """A checkpoint round trip: every learned tensor of ``restored`` (its state outside the frozen
    CLIP) is ``trained``'s bit for bit (a file loaded back), and its outputs on ``inputs`` are
    ``trained``'s up to ``ops`` roundings (what it recomputes for its class names, such as
    hand-written text features, may take another kernel path; a wrong restore moves them by far
    more).  Both models in the mode the caller set."""
    from benchmark.checkpoint import learned_state

    mine, theirs = learned_state(restored), learned_state(trained)
    assert mine.keys() == theirs.keys(), f"{what}: state keys differ: {sorted(set(mine) ^ set(theirs))[:6]}"
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), f"{what}: {key} is not restored"
        else:
            assert mine[key] == value, f"{what}: {key} is not restored"
    with torch.no_grad():
        assert_close(restored(inputs), trained(inputs), ops=ops, scale=scale, what=f"{what}: outputs")


def decisive(scores: torch.Tensor, *, ops: float, scale: float | None = None) -> torch.Tensor:
    """The rows of ``scores`` (samples x classes) whose best score leads the runner-up by more than
    twice the rule's bound: there any other computation of the same scores, off by rounding only,
    predicts the same class.  A prediction (argmax) of another computation is compared exactly on
    these rows only; elsewhere rounding may flip it."""
    scores = torch.as_tensor(scores).detach()
    rtol, atol = tolerance(scores, ops=ops, scale=scale)
    top = scores.double().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]) > 2 * (atol + rtol * top[:, 0].abs())
