"""Crafted checkpoints against ``benchmark.safe_load``: no global outside the exact
allow-list is ever resolved, so none of these files runs code; each is refused with a
message naming the file and what it refers to.  A real warm-up checkpoint (optimiser and
scheduler objects, fp16 and fp32 tensors) still loads into a method.

The hostile pickles are assembled opcode by opcode (checked with ``pickletools``) and
written both as raw pickle files (torch.load's legacy path) and as the ``data.pkl`` of a
real ``torch.save`` zip archive."""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import sys
import zipfile

import numpy
import pytest
import torch

import benchmark
from benchmark.safe_load import (
    ALLOWED_GLOBALS,
    UnsafeCheckpointError,
    _RestrictedUnpickler,
    load_checkpoint,
)

NAMES = ["golden_retriever", "tabby cat", "hot-air balloon"]
# the weights-only first attempt notes protocol 4 before refusing such files
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
NOTHING_RAN = "nothing was imported or run"


# --------------------------------------------------------------------------- opcodes


def _text(s: str, protocol: int) -> bytes:
    data = s.encode()
    if protocol == 0:
        assert b"\n" not in data and b"\\" not in data
        return pickle.UNICODE + data + b"\n"
    if protocol < 4:
        return pickle.BINUNICODE + struct.pack("<I", len(data)) + data
    assert len(data) < 256
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def _global(module: str, name: str, protocol: int) -> bytes:
    if protocol >= 4:
        return _text(module, 4) + _text(name, 4) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: MARK args TUPLE REDUCE (valid in every protocol)."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _list(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.LIST


def _pickle(body: bytes, protocol: int) -> bytes:
    data = (pickle.PROTO + bytes([protocol]) if protocol >= 2 else b"") + body + pickle.STOP
    pickletools.dis(data, out=io.StringIO())  # well-formed, opcode by opcode
    return data


def _touch(marker) -> str:
    return f"touch {marker}"


def _create(marker) -> str:  # a Python expression / statement creating the marker
    return f"open({str(marker)!r}, 'w').close()"


# --------------------------------------------------------------------------- files


def _raw_file(path, payload: bytes):
    path.write_bytes(payload)
    return path


def _zip_file(path, payload: bytes):
    """A real torch.save archive whose data.pkl is replaced by ``payload``."""
    base = path.with_suffix(".base")
    torch.save({"state_dict": {"w": torch.ones(2)}}, base)
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, payload if info.filename.endswith("/data.pkl") else src.read(info))
    base.unlink()
    return path


def _both(tmp_path, payload):
    return [_raw_file(tmp_path / "raw.pth.tar", payload), _zip_file(tmp_path / "zip.pth.tar", payload)]


# --------------------------------------------------------------------------- hostile globals

# name -> (payload for a marker path, what the refusal must say)
HOSTILE = {
    "dotted-stack-global-p4": (lambda m: _pickle(_call(_global("torch.optim.adam", "torch.serialization.os.system", 4),
                                                       _text(_touch(m), 4)), 4), "dotted names are refused"),
    "dotted-global-p2": (lambda m: _pickle(_call(_global("torch.optim.adam", "torch.serialization.os.system", 2),
                                                 _text(_touch(m), 2)), 2), "dotted names are refused"),
    "dotted-global-p0": (lambda m: _pickle(_call(_global("torch.optim.sgd", "torch.os.system", 0),
                                                 _text(_touch(m), 0)), 0), "dotted names are refused"),
    "dotted-method-of-allowed-class": (lambda m: _pickle(_global("torch.optim.sgd", "SGD.__init__", 4), 4),
                                       "dotted names are refused"),
    "dotted-storage-name": (lambda m: _pickle(_global("os", "system.FloatStorage", 2), 2), "dotted names are refused"),
    "module-object": (lambda m: _pickle(_global("torch", "optim", 4), 4), r"torch\.optim, which is not on"),
    "module-object-p2": (lambda m: _pickle(_global("torch.optim", "lr_scheduler", 2), 2), "torch.optim.lr_scheduler"),
    "functional-sgd": (lambda m: _pickle(_global("torch.optim.sgd", "sgd", 4), 4), r"torch\.optim\.sgd\.sgd"),
    "lambda-lr": (lambda m: _pickle(_call(_global("torch.optim.lr_scheduler", "LambdaLR", 2), pickle.NONE), 2),
                  "LambdaLR"),
    "multiplicative-lr": (lambda m: _pickle(_global("torch.optim.lr_scheduler", "MultiplicativeLR", 4), 4),
                          "MultiplicativeLR"),
    "optimizer-base-class": (lambda m: _pickle(_global("torch.optim.optimizer", "Optimizer", 2), 2), "Optimizer"),
    "tensor-module-remap": (lambda m: _pickle(_global("torch.tensor", "_rebuild_from_type_v2", 2), 2),
                            "_rebuild_from_type_v2"),
    "builtins-eval-p2": (lambda m: _pickle(_call(_global("__builtin__", "eval", 2), _text(_create(m), 2)), 2),
                         r"__builtin__\.eval"),
    "builtins-eval-p4": (lambda m: _pickle(_call(_global("builtins", "eval", 4), _text(_create(m), 4)), 4),
                         r"builtins\.eval"),
    "builtins-exec-p0": (lambda m: _pickle(_call(_global("builtins", "exec", 0), _text(_create(m), 0)), 0),
                         r"builtins\.exec"),
    "builtins-getattr": (lambda m: _pickle(_global("builtins", "getattr", 2), 2), r"builtins\.getattr"),
    "os-system-p0": (lambda m: _pickle(_call(_global("os", "system", 0), _text(_touch(m), 0)), 0), r"os\.system"),
    "posix-system-p2": (lambda m: _pickle(_call(_global("posix", "system", 2), _text(_touch(m), 2)), 2),
                        r"posix\.system"),
    "subprocess-popen-p4": (lambda m: _pickle(_call(_global("subprocess", "Popen", 4),
                                                    _list(_text("touch", 4), _text(str(m), 4))), 4),
                            r"subprocess\.Popen"),
    "inst-opcode-p0": (lambda m: _pickle(pickle.MARK + _text(_touch(m), 0) + pickle.INST + b"os\nsystem\n", 0),
                       r"os\.system"),
    "copyreg-reconstructor": (lambda m: _pickle(_global("copy_reg", "_reconstructor", 2), 2), "_reconstructor"),
    # allowed classes called with arguments that try to smuggle a callable
    "ordered-dict-smuggles-system": (
        lambda m: _pickle(_call(_global("collections", "OrderedDict", 2),
                                _list(pickle.MARK + pickle.BININT1 + b"\x00" + _global("posix", "system", 2)
                                      + pickle.TUPLE)), 2), r"posix\.system"),
    "defaultdict-eval-factory": (lambda m: _pickle(_call(_global("collections", "defaultdict", 2),
                                                         _global("__builtin__", "eval", 2)), 2), r"__builtin__\.eval"),
    "scheduler-args-run-exec": (
        lambda m: _pickle(_call(_global("torch.optim.lr_scheduler", "CosineAnnealingLR", 4),
                                _call(_global("builtins", "exec", 4), _text(_create(m), 4)),
                                pickle.BININT1 + b"\x0a"), 4), r"builtins\.exec"),
    "rebuilder-args-run-system": (
        lambda m: _pickle(_call(_global("torch._utils", "_rebuild_parameter", 2),
                                _call(_global("posix", "system", 2), _text(_touch(m), 2)),
                                pickle.NEWFALSE, pickle.EMPTY_DICT), 2), r"posix\.system"),
}


def test_the_headline_payload_is_live_for_the_standard_unpickler(tmp_path):
    """Control: the dotted-name pickle really runs its command when unpickled normally."""
    marker = tmp_path / "marker"
    pickle.loads(HOSTILE["dotted-stack-global-p4"][0](marker))
    assert marker.exists()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_globals_are_refused_and_run_nothing(case, tmp_path):
    build, says = HOSTILE[case]
    marker = tmp_path / "marker"
    payload = build(marker)
    for path in _both(tmp_path, payload):
        with pytest.raises(UnsafeCheckpointError, match=says) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "refused" in message and NOTHING_RAN in message
        assert isinstance(info.value, ValueError)
    with pytest.raises(UnsafeCheckpointError, match=says):  # the unpickler alone, too
        _RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


@pytest.mark.parametrize("form", ["raw", "zip"])
def test_load_official_checkpoint_refuses_the_dotted_name_attack(tiny_clip, tmp_path, form):
    model = benchmark.build("coop", NAMES, clip=tiny_clip, CTX_INIT="a photo of a")
    before = model.prompt_learner.ctx.detach().clone()
    marker = tmp_path / "marker"
    payload = HOSTILE["dotted-stack-global-p4"][0](marker)
    path = (_raw_file if form == "raw" else _zip_file)(tmp_path / "model.pth.tar-50", payload)
    with pytest.raises(ValueError) as info:
        benchmark.load_official_checkpoint(model, path)
    assert isinstance(info.value, UnsafeCheckpointError)
    message = str(info.value)
    assert str(path) in message and "'torch.serialization.os.system'" in message and "'torch.optim.adam'" in message
    assert "dotted names are refused" in message and NOTHING_RAN in message
    assert not marker.exists()
    assert torch.equal(model.prompt_learner.ctx, before)


def test_find_class_returns_exactly_the_mapped_objects_and_imports_nothing(tmp_path, monkeypatch):
    unpickler = _RestrictedUnpickler(io.BytesIO(b""))
    for (module, name), obj in ALLOWED_GLOBALS.items():
        assert "." not in name
        assert unpickler.find_class(module, name) is obj
    assert ALLOWED_GLOBALS[("torch.optim.sgd", "SGD")] is torch.optim.SGD
    assert ALLOWED_GLOBALS[("torch.optim.lr_scheduler", "CosineAnnealingLR")] is torch.optim.lr_scheduler.CosineAnnealingLR
    assert ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")] is torch._utils._rebuild_tensor_v2
    for refused in [("torch.optim.lr_scheduler", "LambdaLR"), ("torch.optim.lr_scheduler", "MultiplicativeLR"),
                    ("torch.optim.sgd", "sgd"), ("torch", "optim"), ("torch.optim", "lr_scheduler"),
                    ("builtins", "getattr"), ("builtins", "__import__")]:
        assert refused not in ALLOWED_GLOBALS
    # a module with an import-time side effect: naming it must not import it
    (tmp_path / "side_effect_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nSGD = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("SGD", "x.y"):
        with pytest.raises(UnsafeCheckpointError, match=NOTHING_RAN):
            unpickler.find_class("side_effect_module", name)
    assert "side_effect_module" not in sys.modules and not (tmp_path / "imported").exists()


# --------------------------------------------------------------------------- allowed objects, hostile data


class _Reduce:
    """Pickles as ``func(*args)`` (+ ``state``): the shapes a hostile writer can produce."""

    def __init__(self, func, args, state=None):
        self.value = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.value


def _smuggling_files():
    param = torch.nn.Parameter(torch.ones(2))
    step_lr = torch.optim.lr_scheduler.StepLR
    return {
        "callable-as-value": ({"state_dict": {"w": torch.ones(2)}, "f": torch._utils._rebuild_tensor_v2}, "callable"),
        "class-as-value": ({"state_dict": {"w": torch.ones(2)}, "c": torch.optim.SGD}, "callable"),
        "defaultdict-class-factory": ({"state": collections.defaultdict(torch.optim.SGD)}, "factory"),
        "tensor-backward-hook": ({"w": _Reduce(torch._utils._rebuild_parameter,
                                               (torch.ones(2), True, collections.OrderedDict({0: step_lr})))}, "hooks"),
        "parameter-state-sets-hooks": ({"w": _Reduce(torch._utils._rebuild_parameter_with_state,
                                                     (torch.ones(2), True, collections.OrderedDict(),
                                                      {"_backward_hooks": collections.OrderedDict({0: step_lr})}))},
                                       "hooks"),
        "optimizer-step-hook": ({"optimizer": _Reduce(torch.optim.SGD, ([param],), {
            "_optimizer_step_pre_hooks": collections.OrderedDict({0: step_lr})})}, "callable"),
    }


@pytest.mark.parametrize("case", sorted(_smuggling_files()))
def test_allowed_objects_carrying_callables_are_refused(case, tmp_path):
    """Every callable such a file can reach is on the allow-list (so nothing foreign can
    run), but a checkpoint holds data: callables, hooks and odd factories are refused."""
    obj, says = _smuggling_files()[case]
    path = tmp_path / "model.pth.tar-1"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match=says) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_allowed_class_with_wrong_arguments_is_a_clear_error(tiny_clip, tmp_path):
    model = benchmark.build("coop", NAMES, clip=tiny_clip, CTX_INIT="a photo of a")
    path = tmp_path / "model.pth.tar-1"
    torch.save({"scheduler": _Reduce(torch.optim.lr_scheduler.CosineAnnealingLR, ("not an optimizer", 10))}, path)
    with pytest.raises(ValueError, match="can be read safely"):
        benchmark.load_official_checkpoint(model, path)


# --------------------------------------------------------------------------- real checkpoints


def _official_warmup_file(path, ctx_half, steps=3):
    """As the official trainer writes after a warm-up run: fp16 prompt, fp32 buffers, the
    optimiser state, and the warm-up scheduler's state holding the pickled successor."""
    param = torch.nn.Parameter(ctx_half.float())
    optim = torch.optim.SGD([param], lr=0.002, momentum=0.9, weight_decay=5e-4)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=50.0)
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        optim.step()
        successor.step()
    scheduler = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": steps,
                 "base_lrs": [0.002], "_step_count": steps + 1}
    torch.save({"state_dict": {"ctx": ctx_half, "token_prefix": torch.zeros(1, dtype=torch.float32),
                               "token_suffix": torch.zeros(1, dtype=torch.float32)},
                "epoch": steps, "optimizer": optim.state_dict(), "scheduler": scheduler,
                "val_result": numpy.float64(71.25)}, path)
    return optim


def _globals_of(path):
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add(tuple(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_real_warmup_checkpoint_loads_into_a_method(tiny_clip, tmp_path):
    model = benchmark.build("coop", NAMES, clip=tiny_clip, CTX_INIT="a photo of a")
    ctx_half = torch.randn_like(model.prompt_learner.ctx).half()
    path = tmp_path / "model.pth.tar-3"
    optim = _official_warmup_file(path, ctx_half)
    with pytest.raises(pickle.UnpicklingError):  # the restricted path is the one exercised
        torch.load(path, weights_only=True)
    used = _globals_of(path)
    assert {("torch.optim.sgd", "SGD"), ("torch.optim.lr_scheduler", "CosineAnnealingLR"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter")} <= used
    assert used <= set(ALLOWED_GLOBALS)
    rest = benchmark.load_official_checkpoint(model, path)
    assert torch.equal(model.prompt_learner.ctx, ctx_half.to(model.prompt_learner.ctx.dtype))
    assert rest["epoch"] == 3 and rest["val_result"] == 71.25
    successor = rest["scheduler"]["successor"]
    assert type(successor) is torch.optim.lr_scheduler.CosineAnnealingLR and successor.last_epoch == 3
    assert type(successor.optimizer) is torch.optim.SGD
    assert successor.optimizer.param_groups[0]["lr"] == pytest.approx(optim.param_groups[0]["lr"])
    buffer = rest["optimizer"]["state"][0]["momentum_buffer"]
    assert buffer.dtype == torch.float32 and torch.equal(buffer, optim.state_dict()["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW", "RMSprop"])
@pytest.mark.parametrize("scheduler", ["CosineAnnealingLR", "MultiStepLR", "StepLR", "ExponentialLR"])
def test_torch_optimisers_and_schedulers_round_trip(tmp_path, optimizer, scheduler):
    param = torch.nn.Parameter(torch.randn(3, 2))
    optim = getattr(torch.optim, optimizer)([param], lr=0.01)
    args = {"CosineAnnealingLR": {"T_max": 10}, "MultiStepLR": {"milestones": [2, 4]},
            "StepLR": {"step_size": 2}, "ExponentialLR": {"gamma": 0.9}}[scheduler]
    sched = getattr(torch.optim.lr_scheduler, scheduler)(optim, **args)
    param.grad = torch.ones_like(param)
    optim.step()
    sched.step()
    path = tmp_path / "model.pth.tar-1"
    torch.save({"scheduler": {"successor": sched}}, path)
    loaded = load_checkpoint(path)["scheduler"]["successor"]
    assert type(loaded) is type(sched) and type(loaded.optimizer) is type(optim)
    assert loaded.state_dict() == sched.state_dict()
