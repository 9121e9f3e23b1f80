"""The toy-world scene renderer, its captions, and a few steps of toy CLIP pre-training."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from tolerance import assert_close, clip_ops

from datasets import toyworld as tw


def _scenes(n: int, seed: int = 0, **kwargs) -> list[tw.Scene]:
    rng = np.random.default_rng(seed)
    return [tw.sample_scene(rng, **kwargs) for _ in range(n)]


def test_vocabularies_are_lowercase_and_distinct():
    words = list(tw.SHAPES) + list(tw.COLOURS) + list(tw.SIZES) + list(tw.PATTERNS) + list(tw.BACKGROUNDS)
    assert all(w == w.lower() for w in words)
    assert len(set(words)) == len(words)  # a caption word names one attribute only
    assert tw.STYLES[0] == "photo"
    assert {"sketch", "painting", "noisy", "inverted", "pixelated"} <= set(tw.STYLES)
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in tw.COLOURS.values())


def test_held_out_pairs_are_a_fifth_of_the_grid_and_leave_every_attribute_seen():
    n_pairs = len(tw.SHAPES) * len(tw.COLOURS)
    assert 0.15 * n_pairs <= len(tw.HELD_OUT) <= 0.2 * n_pairs
    assert all(s in tw.SHAPES and c in tw.COLOURS for s, c in tw.HELD_OUT)
    for shape in tw.SHAPES:
        assert sum((shape, c) not in tw.HELD_OUT for c in tw.COLOURS) >= len(tw.COLOURS) // 2
    for colour in tw.COLOURS:
        assert sum((s, colour) not in tw.HELD_OUT for s in tw.SHAPES) >= len(tw.SHAPES) // 2


def test_sample_scene_avoids_held_out_pairs_unless_allowed():
    scenes = _scenes(3000)
    assert not any((s.shape, s.colour) in tw.HELD_OUT for s in scenes)
    assert {s.style for s in scenes} == {"photo"}
    allowed = _scenes(3000, held_out_ok=True, styles=("sketch", "noisy"))
    assert any((s.shape, s.colour) in tw.HELD_OUT for s in allowed)
    assert {s.style for s in allowed} == {"sketch", "noisy"}


def test_scene_rejects_unknown_values():
    with pytest.raises(ValueError, match="Unknown shape"):
        tw.Scene("blob", "red")
    with pytest.raises(ValueError, match="Unknown style"):
        tw.Scene("star", "red", style="cartoon")


def test_render_is_deterministic_for_the_rng_and_varies_between_draws():
    scene = tw.Scene("star", "red", "small", "striped", "grass")
    a = np.asarray(tw.render(scene, 48, np.random.default_rng(5)))
    b = np.asarray(tw.render(scene, 48, np.random.default_rng(5)))
    c = np.asarray(tw.render(scene, 48, np.random.default_rng(6)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("style", tw.STYLES)
@pytest.mark.parametrize("size", [32, 48])
def test_every_style_renders_an_rgb_square(style, size):
    rng = np.random.default_rng(1)
    image = tw.render(tw.Scene("heart", "blue", style=style), size, rng)
    assert image.mode == "RGB" and image.size == (size, size)
    assert np.asarray(image).std() > 5  # something is drawn


def test_every_attribute_value_renders_and_changes_the_image():
    base = tw.Scene("square", "green", "large", "plain", "white")
    reference = np.asarray(tw.render(base, 48, np.random.default_rng(0)), np.float32)
    variants = (
        [("shape", v) for v in tw.SHAPES] + [("colour", v) for v in tw.COLOURS] + [("size", v) for v in tw.SIZES]
        + [("pattern", v) for v in tw.PATTERNS] + [("background", v) for v in tw.BACKGROUNDS]
    )
    for field, value in variants:
        scene = dataclasses.replace(base, **{field: value})
        image = np.asarray(tw.render(scene, 48, np.random.default_rng(0)), np.float32)
        assert image.shape == (48, 48, 3)
        if getattr(base, field) != value:
            # same rng stream: only the changed attribute can move pixels this much
            assert np.abs(image - reference).mean() > 1.0, (field, value)


def test_shape_is_coloured_as_named_on_a_white_background():
    rng = np.random.default_rng(0)
    for name, rgb in tw.COLOURS.items():
        image = np.asarray(tw.render(tw.Scene("square", name, "large", "plain", "white"), 48, rng), np.float32)
        distance = np.abs(image - np.array(rgb, np.float32)).sum(axis=2)
        assert (distance < 90).mean() > 0.15, name  # a large plain square covers a good part of the image


def test_caption_is_deterministic_and_varied():
    scene = tw.Scene("star", "red", "small", "striped", "grass")
    assert tw.caption(scene, np.random.default_rng(3)) == tw.caption(scene, np.random.default_rng(3))
    rng = np.random.default_rng(0)
    assert len({tw.caption(scene, rng) for _ in range(200)}) > 30


_VOCABULARIES = {
    "shape": tw.SHAPES, "colour": tuple(tw.COLOURS), "size": tw.SIZES, "pattern": tw.PATTERNS,
    "background": tw.BACKGROUNDS,
}
_STYLE_WORDS = {
    "photo": ("photo", "picture", "image", "rendering"), "sketch": ("sketch", "drawing"), "painting": ("painting",),
    "noisy": ("noisy photo",), "inverted": ("inverted photo",), "pixelated": ("pixelated photo",),
}


def test_captions_mention_only_the_scenes_own_attributes():
    rng = np.random.default_rng(0)
    mentioned = {field: 0 for field in _VOCABULARIES}
    for scene in _scenes(2000, held_out_ok=True, styles=tw.STYLES):
        text = tw.caption(scene, rng)
        words = set(re.findall(r"[a-z]+", text.lower()))
        for field, vocabulary in _VOCABULARIES.items():
            named = {v for v in vocabulary if v in words}
            assert named <= {getattr(scene, field)}, (scene, text)
            mentioned[field] += bool(named)
        assert any(w in text for w in _STYLE_WORDS[scene.style]) or scene.style == "photo", (scene, text)
        for other, style_words in _STYLE_WORDS.items():
            if other not in ("photo", scene.style):
                assert not any(w in text for w in style_words), (scene, text)
        if scene.style == "sketch":  # a sketch shows neither colour nor background
            assert not words & set(tw.COLOURS) and "background" not in words
    # every attribute is named often and often left out; the shape is named most
    assert all(200 < count < 1800 for field, count in mentioned.items() if field != "shape"), mentioned
    assert max(mentioned.values()) == mentioned["shape"] < 2000


def test_truncated_text_encoder_equals_the_full_one(tiny_clip):
    import open_clip

    from benchmark.toy_pretrain import encode_text_truncated

    tokens = open_clip.tokenize(["a photo of a star.", "a small red striped star on a grass background"]).long()
    with torch.no_grad():
        full = tiny_clip.encode_text(tokens)
        short = encode_text_truncated(tiny_clip, tokens)
    assert_close(short, full, ops=clip_ops(tiny_clip))  # a shorter sequence: other reductions


def test_a_few_pretraining_steps_lower_the_loss_and_repeat_bit_for_bit():
    from benchmark.toy_pretrain import pretrain

    # one fixed tiny batch (overfit=True) is learned within a few steps
    _, losses = pretrain(steps=6, seed=0, batch_size=16, lr=2e-3, warmup=1, overfit=True)
    assert losses[-1] < losses[0]
    a, losses_a = pretrain(steps=2, seed=1, batch_size=8, warmup=1)
    b, losses_b = pretrain(steps=2, seed=1, batch_size=8, warmup=1)
    # exact: a rerun is the same operations on the same batches in this process (bit identity is the claim)
    assert losses_a == losses_b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_zero_shot_report_covers_every_task_with_its_chance_level(tiny_clip):
    from benchmark.toy_pretrain import zero_shot_report

    report = zero_shot_report(tiny_clip, 32, n_per_class=1, seed=0)
    n_novel = len(tw.HELD_OUT)
    n_seen = len(tw.SHAPES) * len(tw.COLOURS) - n_novel
    expected_ways = {
        "shape": len(tw.SHAPES), "colour": len(tw.COLOURS), "pattern": len(tw.PATTERNS), "size": len(tw.SIZES),
        "background": len(tw.BACKGROUNDS), "composition_novel": n_novel, "composition_seen": n_seen,
        "composition_novel_all_pairs": n_novel + n_seen, "composition_seen_all_pairs": n_novel + n_seen,
    }
    for task, ways in expected_ways.items():
        assert report[task]["n_classes"] == ways
        assert report[task]["chance"] == pytest.approx(100.0 / ways)
        assert 0.0 <= report[task]["accuracy"] <= 100.0
    assert report["composition_novel"]["n_images"] == n_novel
    assert set(report["shape_by_style"]) == set(tw.STYLES)


def test_a_time_budget_picks_a_step_count_that_a_rerun_with_that_count_repeats(monkeypatch):
    from types import SimpleNamespace

    from benchmark import toy_pretrain
    from benchmark.toy_pretrain import _lr_at, pretrain, render_pool

    pool = render_pool(24, 48, seed=3, captions_per_image=2)
    assert pool.images.shape == (24, 48, 48, 3) and pool.tokens.shape[:2] == (24, 2)
    # a clock that reads one second later at every look: the training start (0), the calibration's
    # start after step 5 (1) and end after step 6, the end of the warm-up (2: one second a step), the
    # time spent (3): a budget of 9 s leaves 6 steps after the 6 done, past the warm-up into the
    # cosine, whose rates depend on the count chosen (not on the 10,000 asked for)
    ticks = iter(range(1_000))
    monkeypatch.setattr(toy_pretrain, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    a, losses_a = pretrain(steps=10_000, seed=3, batch_size=4, warmup=6, pool=pool, time_budget_s=9.0)
    assert len(losses_a) == 12
    assert _lr_at(10, 12, 6, 1e-3) < 0.5 * 1e-3 < _lr_at(10, 10_000, 6, 1e-3)  # the count moves the rates used
    # a budget spent before the speed is known: the calibration's minimum, the warm-up
    assert len(pretrain(steps=10_000, seed=3, batch_size=4, warmup=6, pool=pool, time_budget_s=1e-3)[1]) == 6
    b, losses_b = pretrain(steps=len(losses_a), seed=3, batch_size=4, warmup=6, pool=pool)
    # exact: the rerun is the same operations on the same batches in this process (bit identity is the claim)
    assert losses_a == losses_b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
