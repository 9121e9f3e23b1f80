"""Every fast path against the plain path (``benchmark.speed``): the same logits, the same
gradients, the same training trajectory and the same records, on the tiny CLIP and
datasets written on disk."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerance import approx, assert_close, clip_ops

import benchmark
from benchmark.loaders import eval_inputs
from benchmark.trainer import batch_logits, execute, train
from datasets.build import build_dataset

# class names of very different token lengths, so that truncation cuts real padding
NAMES = ["ox", "a rather long class name made of many separate words", "tabby cat"]
PROMPT_METHODS = ["coop", "cocoop", "kgcoop", "maple", "promptsrc", "mma", "zsclip", "clip_adapter", "tip_adapter"]
FROZEN_METHODS = ["zsclip", "coop", "cocoop", "kgcoop", "clip_adapter"]


def _pair(name, clip, **fast):
    """The same method built twice from the same seed: plain, and with the given fast paths."""
    models = []
    for on in (False, True):
        torch.manual_seed(0)
        options = {f"SPEED.{k}": (v if on else False) for k, v in fast.items()}
        models.append(benchmark.build(name, NAMES, clip=copy.deepcopy(clip), **options))
    models[1].load_state_dict(models[0].state_dict())
    return models


def _logits_and_grads(model, images):
    model.train()
    model.zero_grad()
    logits = model(images)
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        model.loss(logits, torch.tensor([0, 1, 2, 1])).backward()
    return logits.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_truncated_prompts_give_the_same_logits_and_gradients(name, tiny_clip):
    plain, fast = _pair(name, tiny_clip, TRUNCATE_TEXT=True, FROZEN_TEXT=False, SHARED_PREFIX=False)
    images = torch.randn(4, 3, 32, 32)
    logits, grads = _logits_and_grads(plain, images)
    fast_logits, fast_grads = _logits_and_grads(fast, images)
    assert_close(fast_logits, logits, ops=clip_ops(tiny_clip), what="logits")
    assert len(grads) == len(fast_grads)
    for g, h in zip(grads, fast_grads):
        assert_close(h, g, ops=clip_ops(tiny_clip, passes=2), what="gradient")
    with torch.no_grad():  # evaluation (cached text features where a method keeps them)
        plain.eval(), fast.eval()
        assert_close(fast(images), plain(images), ops=clip_ops(tiny_clip), what="evaluation logits")


def test_truncation_really_shortens_the_text_pass(tiny_clip):
    """The fast path runs the blocks on the longest real sequence, not on 77 positions."""
    lengths = {}
    for on in (False, True):
        model = benchmark.build("coop", NAMES, clip=copy.deepcopy(tiny_clip),
                                **{"SPEED.TRUNCATE_TEXT": on, "SPEED.SHARED_PREFIX": False})
        seen = []
        hook = model.clip.transformer.resblocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        hook.remove()
        lengths[on] = seen[0]
    longest = int(model.prompt_learner.tokenized_prompts.argmax(dim=-1).max()) + 1
    assert lengths == {False: 77, True: longest} and longest < 40


SHARED_PREFIX_METHODS = ["coop", "cocoop", "kgcoop", "prograd", "lasp", "lasp_v"]


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("name", SHARED_PREFIX_METHODS)
def test_shared_prefix_gives_the_same_logits_and_gradients(name, truncate, tiny_clip):
    plain, fast = _pair(name, tiny_clip, SHARED_PREFIX=True, TRUNCATE_TEXT=truncate)
    images = torch.randn(4, 3, 32, 32)
    for step in range(3):  # the same trajectory over a few SGD steps
        torch.manual_seed(step)  # the same random draws in both (LASP's noise)
        logits, grads = _logits_and_grads(plain, images)
        torch.manual_seed(step)
        fast_logits, fast_grads = _logits_and_grads(fast, images)
        assert_close(fast_logits, logits, ops=clip_ops(tiny_clip, passes=2 * step + 1), what=f"logits, step {step}")
        assert len(grads) == len(fast_grads) > 0
        for g, h in zip(grads, fast_grads):
            assert_close(h, g, ops=clip_ops(tiny_clip, passes=2 * step + 2), what=f"gradient, step {step}")
        for model, gs in ((plain, grads), (fast, fast_grads)):
            with torch.no_grad():
                for p, g in zip([p for p in model.parameters() if p.requires_grad], gs):
                    p -= 10.0 * g
    with torch.no_grad():
        plain.eval(), fast.eval()
        assert_close(fast(images), plain(images), ops=clip_ops(tiny_clip, passes=7), what="evaluation logits")
        plain.set_classnames(["fox", "grey wolf"]), fast.set_classnames(["fox", "grey wolf"])
        assert_close(fast(images), plain(images), ops=clip_ops(tiny_clip, passes=7), what="new class names")


def _text_positions(model, images):
    """The positions the first text block sees in one forward pass (None: it never ran)."""
    seen = []
    hook = model.clip.transformer.resblocks[0].ln_1.register_forward_hook(
        lambda m, i, o: seen.append(o.shape[:-1].numel()))
    with torch.no_grad():
        model(images)
    hook.remove()
    return seen[0] if seen else None


def test_shared_prefix_runs_the_shared_positions_once_and_only_where_they_are_shared(tiny_clip):
    images = torch.randn(2, 3, 32, 32)
    context = {"N_CTX": 4, "CTX_INIT": ""}  # four learned vectors (an initial phrase would set their number)
    model = benchmark.build("coop", NAMES, clip=copy.deepcopy(tiny_clip), **context)
    tokens = model.prompt_learner.tokenized_prompts
    longest = int(tokens.argmax(dim=-1).max()) + 1
    # [SOS] and 4 context vectors once, then each class's positions after them
    assert _text_positions(model, images) == 5 + len(NAMES) * (longest - 5)
    cocoop = benchmark.build("cocoop", NAMES, clip=copy.deepcopy(tiny_clip), **context)
    assert _text_positions(cocoop, images) == len(images) * (5 + len(NAMES) * (longest - 5))
    # prompts that differ from their first positions on run whole, every one of them
    for options in ({"CSC": True}, {"CLASS_TOKEN_POSITION": "middle"}, {"CLASS_TOKEN_POSITION": "front"},
                    {"SPEED.SHARED_PREFIX": False}):
        other = benchmark.build("coop", NAMES, clip=copy.deepcopy(tiny_clip), **context, **options)
        assert _text_positions(other, images) == len(NAMES) * longest, options


def test_shared_prefix_leaves_text_towers_of_other_blocks_to_the_plain_path(tiny_clip):
    from methods.text_prefix import supports_shared_prefix

    assert supports_shared_prefix(tiny_clip)
    class OtherAttention(torch.nn.MultiheadAttention):  # an attention of its own (a subclass may change it)
        pass

    other = copy.deepcopy(tiny_clip)
    other.transformer.resblocks[3].attn.__class__ = OtherAttention
    assert not supports_shared_prefix(other)
    plain, fast = (benchmark.build("coop", NAMES, clip=copy.deepcopy(other), **{"SPEED.SHARED_PREFIX": on})
                   for on in (False, True))
    fast.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert _text_positions(fast, images) == _text_positions(plain, images)
    # prompts whose end-of-text token lies inside the shared positions: not served either
    model = benchmark.build("coop", NAMES, clip=copy.deepcopy(tiny_clip))
    learner = model.prompt_learner
    prefix = learner.shared_prefix()
    tokens = learner.tokenized_prompts
    assert model.encode_shared(prefix, learner.token_suffix, tokens) is not None
    early = tokens.clone()
    early[0, prefix.shape[1] - 1] = tokens.max() + 1  # the largest id marks the end of text
    assert model.encode_shared(prefix, learner.token_suffix, early) is None


def test_mma_frozen_text_layers_run_once_per_class_set_and_precision(tiny_clip):
    plain, fast = _pair("mma", tiny_clip, FROZEN_TEXT=True)
    first_block = fast.clip.transformer.resblocks[0]
    calls = []
    first_block.register_forward_hook(lambda m, i, o: calls.append(1))
    images = torch.randn(4, 3, 32, 32)
    for step in range(3):  # the same trajectory over a few SGD steps
        logits, grads = _logits_and_grads(plain, images)
        fast_logits, fast_grads = _logits_and_grads(fast, images)
        # after `step` updates: a forward and a backward pass per earlier step, then this forward
        assert_close(fast_logits, logits, ops=clip_ops(tiny_clip, passes=2 * step + 1), what=f"logits, step {step}")
        for model, gs in ((plain, grads), (fast, fast_grads)):
            with torch.no_grad():
                for p, g in zip([p for p in model.parameters() if p.requires_grad], gs):
                    p -= 100.0 * g
    assert len(calls) == 1  # block 1 lies below the first adapter (layer 5): computed once
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: computed again, for it
        # not a rounding bound: both sides run the same bf16 operations (the prefix of the fast
        # path is the output of the same blocks); 1e-2 is less than one bf16 rounding at the
        # scale of these logits (eps 7.8e-3 times about 6)
        assert torch.allclose(plain(images).float(), fast(images).float(), atol=1e-2)
    assert len(calls) == 2
    plain.set_classnames(["fox", "wolf"]), fast.set_classnames(["fox", "wolf"])
    assert_close(fast(images), plain(images), ops=clip_ops(tiny_clip, passes=2 * 3 + 1), what="new class names")
    assert len(calls) == 3


def _eval_cfg(name, cache_dir, **speed):
    cfg = benchmark.make_config(name, "eurosat", **{"DATALOADER.NUM_WORKERS": 0, "SPEED.CACHE_DIR": str(cache_dir),
                                                    **{f"SPEED.{k}": v for k, v in speed.items()}})
    cfg.INPUT.SIZE = (32, 32)
    cfg.freeze()
    return cfg


def _all_logits(model, data, cfg, backbone_id="tiny"):
    return torch.cat(list(batch_logits(model, data, eval_inputs(model, cfg, torch.device("cpu"), backbone_id), "fp32")))


def test_feature_cache_gives_the_plain_logits_and_is_shared_by_every_frozen_method(tiny_clip, synthetic_root,
                                                                                     tmp_path):
    data = build_dataset("eurosat", synthetic_root, num_shots=0, seed=1, subsample="all")
    for index, name in enumerate(FROZEN_METHODS):
        torch.manual_seed(0)
        model = benchmark.build(name, data.classnames, clip=copy.deepcopy(tiny_clip))
        calls = []
        model.clip.visual.register_forward_hook(lambda m, i, o: calls.append(len(o)))
        plain = _all_logits(model, data.test, _eval_cfg(name, tmp_path, ENABLED=False))
        assert sum(calls) == len(data.test)
        calls.clear()
        fast = _all_logits(model, data.test, _eval_cfg(name, tmp_path, IMAGE_CACHE=False))
        assert_close(fast, plain, ops=clip_ops(tiny_clip), what=name)
        # the first method encodes the test images once; every later one reads them back
        assert sum(calls) == (len(data.test) if index == 0 else 0)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 1


def test_feature_cache_keys_and_damaged_entries(tiny_clip, synthetic_root, tmp_path):
    from benchmark.feature_cache import feature_key

    data = build_dataset("eurosat", synthetic_root, num_shots=0, seed=1, subsample="base")
    cfg = _eval_cfg("zsclip", tmp_path, IMAGE_CACHE=False)
    key = dict(backbone_id="tiny", weight_dtype=torch.float32, precision="fp32", device=torch.device("cpu"))
    base = feature_key(data.test, cfg, **key)
    assert base == feature_key(list(data.test), cfg, **key)
    assert base != feature_key(data.test[::-1], cfg, **key)
    for change in (dict(backbone_id="other"), dict(weight_dtype=torch.float16), dict(precision="bf16")):
        assert base != feature_key(data.test, cfg, **{**key, **change})
    other = cfg.clone()
    other.defrost()
    other.INPUT.INTERPOLATION = "bilinear"
    assert base != feature_key(data.test, other, **key)

    model = benchmark.build("zsclip", data.classnames, clip=copy.deepcopy(tiny_clip))
    expected = _all_logits(model, data.test, cfg)
    entry = tmp_path / "features" / f"{base}.pt"
    assert entry.is_file()
    entry.write_bytes(b"not a tensor file")  # damaged: recomputed, never trusted
    assert_close(_all_logits(model, data.test, cfg), expected, ops=clip_ops(tiny_clip))
    assert torch.load(entry, weights_only=True)["features"].shape[0] == len(data.test)


def test_training_trajectory_is_the_same_with_every_fast_path(tiny_clip, synthetic_root, tmp_path):
    data = build_dataset("eurosat", synthetic_root, num_shots=4, seed=1, subsample="base")
    for name in ("mma", "coop"):
        runs = []
        for enabled in (False, True):
            cfg = benchmark.make_config(name, "eurosat", **{"OPTIM.MAX_EPOCH": 2, "DATALOADER.NUM_WORKERS": 0,
                                                            "SPEED.ENABLED": enabled,
                                                            "SPEED.CACHE_DIR": str(tmp_path)})
            cfg.INPUT.SIZE = (32, 32)
            cfg.freeze()
            torch.manual_seed(0)
            model = benchmark.build(name, data.classnames, clip=copy.deepcopy(tiny_clip),
                                    **{"SPEED.ENABLED": enabled})
            torch.manual_seed(1)
            result = train(model, data.train, cfg, torch.device("cpu"), "fp32")
            learned = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            runs.append((result.epoch_losses, learned, _all_logits(model, data.test, cfg), result.steps))
        (losses, learned, logits, steps), (fast_losses, fast_learned, fast_logits, _) = runs
        # the two trajectories drift apart by a forward and a backward pass of rounding per step
        trained = clip_ops(tiny_clip, passes=2 * steps)
        assert len(losses) == 2 and fast_losses == approx(losses, ops=trained)
        for k in learned:
            assert_close(fast_learned[k], learned[k], ops=trained, what=f"{name} {k}")
        assert_close(fast_logits, logits, ops=clip_ops(tiny_clip, passes=2 * steps + 1), what=f"{name} logits")


@pytest.mark.parametrize("name", ["zsclip", "coop", "mma", "linear_probe", "tip_adapter"])
def test_records_are_the_same_with_the_fast_paths_on_and_off(name, synthetic_root, tmp_path, tiny_clip):
    from benchmark.protocols import base2novel

    def spec(*speed):
        opts = ["OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0", "SPEED.CACHE_DIR", str(tmp_path), *speed]
        return base2novel([name], ["eurosat"], [1], 4, root=str(synthetic_root), backbone="tiny-clip-12",
                          backbone_id="tiny", opts=opts)[0]

    plain, fast = spec("SPEED.ENABLED", "False"), spec()
    assert plain.run_id == fast.run_id  # fast paths are not part of a run's identity
    records = [execute(plain, "cpu"), execute(fast, "cpu"), execute(fast, "cpu")]  # the last one reads caches
    for split in ("base", "novel"):
        values = [r["metrics"][split].get("accuracy") for r in records]
        assert values[0] == values[1] == values[2], (split, values)
    trained = clip_ops(tiny_clip, passes=2 * records[0]["train"]["steps"])  # the run's backbone: tiny-clip-12
    assert records[1]["train"]["epoch_losses"] == approx(records[0]["train"]["epoch_losses"], ops=trained)
    caches = {p.parent.name for p in tmp_path.rglob("*") if p.is_file()}
    # frozen image towers keep features; the others keep decoded test images
    assert caches == ({"images"} if name == "mma" else {"features"})


def test_bench_command_measures_every_fast_path_and_saves_json_and_markdown(tmp_path, tiny_clip):
    import json

    from benchmark.cli import main

    args = ["bench", "--methods", "mma,zsclip", "--classes", "4", "--test-per-class", "2", "--text-classes", "12",
            "--repeats", "1", "--steps", "1", "--epochs", "1", "--device", "cpu", "--toy-dataset", "none",
            "--output", str(tmp_path)]  # the toy-world section: tests/test_stages.py
    assert main(args) == 0
    (saved,) = (tmp_path / "bench").glob("*.json")
    result = json.loads(saved.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"mma", "zsclip"} and result["meta"]["device"].startswith("cpu")
    mma, zsclip = rows["mma"], rows["zsclip"]
    for key in ("text_ms", "train_img_s", "eval_img_s", "run_s"):
        assert mma[f"{key}_plain"] > 0 and mma[f"{key}_fast"] > 0, key
    assert "text_ms_plain" not in zsclip and "train_img_s_plain" not in zsclip  # nothing trains
    assert zsclip["eval_img_s_fast"] > zsclip["eval_img_s_plain"]  # features read back from the cache
    # the gaps are relative to the largest logit, in float32 on the bench's backbone (tiny-clip-12):
    # one forward pass of rounding, and after three optimiser steps a forward and a backward more each
    eps = torch.finfo(torch.float32).eps
    for row in rows.values():  # the same records with the fast paths on and off
        assert row["run_acc_plain"] == row["run_acc_fast_cold"] == row["run_acc_fast"]
        assert row["logit_gap"] <= clip_ops(tiny_clip) * eps
        assert row["logit_gap_after_steps"] <= clip_ops(tiny_clip, passes=2 * 3 + 1) * eps
        assert row["eval_images"] == 4 * 2
    table = saved.with_suffix(".md").read_text()
    assert table.count("\n| mma |") == 1 and table.count("\n| zsclip |") == 1 and " -> " in table


def test_bench_rejects_bad_sizes(tmp_path, capsys):
    from benchmark.cli import main

    assert main(["bench", "--classes", "1", "--output", str(tmp_path)]) == 2
    assert "--classes" in capsys.readouterr().out
