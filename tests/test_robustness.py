"""Faults and bad input on real files: a run that cannot go on says why and where, and
nothing already finished is lost (the README's "Guarantees" section lists what these
tests prove)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmark.protocols import base2novel
from benchmark.trainer import TrainingError, execute
from methods.registry import Method, register_method


def _spec(root, method="coop", shots=4, *opts):
    return base2novel([method], ["eurosat"], [1], shots, root=str(root), backbone="tiny-clip-12", backbone_id="tiny",
                      opts=["OPTIM.MAX_EPOCH", "2", "DATALOADER.NUM_WORKERS", "0", *opts])[0]


def test_non_finite_loss_stops_the_run_with_epoch_step_and_last_finite_loss(synthetic_root):
    with pytest.raises(TrainingError) as caught:
        execute(_spec(synthetic_root, "coop", 4, "OPTIM.LR", "1e400", "OPTIM.WARMUP_EPOCH", "0",
                      "OPTIM.MAX_EPOCH", "3"), "cpu")  # an infinite learning rate
    details = caught.value.details
    # one batch per epoch: the first step is finite, the infinite update breaks the next one
    assert details["kind"] == "non_finite_loss" and (details["epoch"], details["step"]) == (2, 1)
    assert 0 < details["last_finite_loss"] < 10 and details["loss"] in ("nan", "inf")
    message = str(caught.value)
    assert f"epoch {details['epoch']}, step {details['step']}" in message and "Lower OPTIM.LR" in message


@register_method("oom_probe", node="OOM_PROBE", defaults=dict(PREC="fp32", WHEN="training"))
class OutOfMemoryProbe(Method):
    """Zero-shot-like logits; raises the allocator's own out-of-memory error where told."""

    trainable = ("scale",)

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def set_classnames(self, classnames):
        self.classnames = list(classnames)

    def forward(self, images):
        if str(self.options.WHEN) == ("training" if self.training else "evaluation"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.scale * self.clip.encode_image(images)[:, :1].expand(-1, len(self.classnames))


@pytest.mark.parametrize("when,key", [("training", "DATALOADER.TRAIN_X.BATCH_SIZE"),
                                      ("evaluation", "SPEED.EVAL_BATCH_SIZE")])
def test_out_of_memory_names_the_batch_size_and_a_fix(synthetic_root, when, key):
    spec = _spec(synthetic_root, "oom_probe", 4, "TRAINER.OOM_PROBE.WHEN", when)
    with pytest.raises(TrainingError) as caught:
        execute(spec, "cpu")
    details = caught.value.details
    assert details["kind"] == "out_of_memory" and details["stage"] == when
    assert f"batch size {details['batch_size']}" in str(caught.value) and key in str(caught.value)


def test_more_shots_than_images_keeps_every_image_and_says_so(tmp_path, caplog):
    from datasets.synthetic import write_synthetic_root

    root = write_synthetic_root(tmp_path / "data", ["eurosat"], n_train=3)
    record = execute(_spec(root, "zsclip", 8), "cpu")
    short = record["train"]["classes_short_of_shots"]
    assert short and set(short.values()) == {3}  # the reference sampler keeps all 3, never repeats
    assert record["train"]["n_images"] == 3 * record["train"]["n_classes"]
    assert any("fewer than 8 training images" in r.getMessage() for r in caplog.records)


def test_a_truncated_test_image_fails_its_run_naming_the_file(tmp_path):
    from datasets.build import build_dataset
    from datasets.synthetic import write_synthetic_root

    root = write_synthetic_root(tmp_path / "data", ["eurosat"])
    victim = build_dataset("eurosat", root, num_shots=0, subsample="base").test[0].impath
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])  # a JPEG cut off mid-file
    for speed in ("True", "False"):  # through the decoded-image cache and through the plain loader
        with pytest.raises(OSError) as caught:
            execute(_spec(root, "mma", 4, "SPEED.ENABLED", speed, "SPEED.CACHE_DIR", str(tmp_path / "cache")), "cpu")
        assert victim in str(caught.value) and "re-extract" in str(caught.value)


def test_a_full_disk_never_leaves_a_half_written_record(tmp_path):
    """The process's file-size limit makes the write fail the way a full disk does."""
    from benchmark import store

    path = tmp_path / "records" / "run.json"
    store.write_json_atomic(path, {"status": "ok", "value": 1})
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from benchmark import store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            store.write_json_atomic({str(path)!r}, {{"status": "ok", "value": "x" * 100000}})
        except OSError as exc:
            print("failed:", exc.errno)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert json.loads(path.read_text()) == {"status": "ok", "value": 1}  # the old record, whole
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temporary file left


def test_own_checkpoint_reproduces_the_evaluation_exactly(synthetic_root, tmp_path):
    spec = _spec(synthetic_root, "mma", 4)
    checkpoint = tmp_path / "mma.pt"
    first = execute(spec, "cpu", checkpoint=checkpoint, save_checkpoint=True)
    partial = dict(first, metrics={"base": first["metrics"]["base"]})  # as if novel had not been evaluated
    again = execute(spec, "cpu", previous=partial, checkpoint=checkpoint)
    assert again["resumed_from_checkpoint"] and again["train"] == first["train"]
    # exact, the claim of this test: the restored model evaluates with the same operations on the same
    # shapes in this process as the trained one did, so not even a near tie can move
    assert again["metrics"]["novel"]["accuracy"] == first["metrics"]["novel"]["accuracy"]
    assert again["metrics"]["novel"]["n_correct"] == first["metrics"]["novel"]["n_correct"]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, tiny_clip):
    import benchmark
    from benchmark import checkpoint

    model = benchmark.build("mma", ["a", "b"], clip=tiny_clip)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(model, junk)
    other = benchmark.build("coop", ["a", "b"], clip=tiny_clip)
    checkpoint.save(other, tmp_path / "coop.pt")
    with pytest.raises(checkpoint.CheckpointError, match="written by method 'coop'"):
        checkpoint.load(model, tmp_path / "coop.pt")
    wide = benchmark.build("mma", ["a", "b"], clip=tiny_clip, ADAPTER_DIM=16)
    checkpoint.save(wide, tmp_path / "wide.pt")
    with pytest.raises(checkpoint.CheckpointError, match="shape"):
        checkpoint.load(model, tmp_path / "wide.pt")


# -- bad input on the command line: a clear message and a non-zero exit, before any work --
def _cli(capsys, *args):
    from benchmark.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


@pytest.mark.parametrize("args,expected", [
    (("--methods", "mmaa"), "Did you mean: mma"),
    (("--datasets", "eurosatt"), "eurosat"),
    (("--protocol", "base2novell"), "base2novel"),
    (("--seeds", "1,two"), "expected comma-separated integers"),
    (("--shots", "4,x"), "expected comma-separated integers"),
    (("--shots", "0"), "--shots must be positive"),
    (("--opts", "OPTIM.NO_SUCH_KEY", "1"), "does not exist"),
    (("--opts", "OPTIM.MAX_EPOCH", "ten"), "of the key's type"),
])
def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys, args, expected):
    code, text = _cli(capsys, "--world", "synthetic", "--output", str(tmp_path / "out"), *args)
    assert code == 2 and expected in text, text
    assert not (tmp_path / "out" / "records").exists()  # nothing ran


def test_listed_test_images_missing_on_disk_are_reported_before_any_run(tmp_path, capsys):
    from datasets.build import build_dataset
    from datasets.synthetic import write_synthetic_root

    root = write_synthetic_root(tmp_path / "data", ["eurosat"])
    gone = build_dataset("eurosat", root, num_shots=0).test[-1].impath
    Path(gone).unlink()
    code, text = _cli(capsys, "--root", str(root), "--methods", "zsclip", "--datasets", "eurosat",
                      "--output", str(tmp_path / "out"))
    assert code == 2 and gone in text and "not on disk" in text
    assert not (tmp_path / "out" / "records").exists()


def test_an_empty_class_list_is_refused(tiny_clip):
    import benchmark
    from methods.registry import MethodError

    with pytest.raises(MethodError, match="at least one class name"):
        benchmark.build("coop", [], clip=tiny_clip)


def test_a_failed_run_is_recorded_with_its_details_and_the_sweep_goes_on(tmp_path, capsys):
    from benchmark import store

    out = tmp_path / "out"
    code, text = _cli(capsys, "--methods", "coop,zsclip", "--world", "synthetic", "--datasets", "eurosat",
                      "--seeds", "1", "--output", str(out), "--opts", "OPTIM.LR", "1e400", "OPTIM.WARMUP_EPOCH", "0",
                      "OPTIM.MAX_EPOCH", "3")
    assert code == 1 and "1 done" in text and "1 failed" in text and "Loss is nan" in text
    records = {r["method"]: r for r in store.iter_records(out)}
    assert records["zsclip"]["status"] == "ok"
    failed = records["coop"]
    assert failed["status"] == "failed" and failed["details"]["kind"] == "non_finite_loss"
    assert (failed["details"]["epoch"], failed["details"]["step"]) == (2, 1) and "Traceback" in failed["traceback"]
