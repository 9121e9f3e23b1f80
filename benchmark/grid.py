"""Grids of config values: an ablation is a sweep (``--grid KEY=v1,v2,...``, repeatable).

The cartesian product of the values becomes part of each run's config, merged like
``--opts KEY VALUE`` after everything else, and therefore part of its identity (a hash of
the resolved config): a grid resumes like any sweep, and a grid point whose values are
those the run has anyway (the official value) has the identity of the run without the
grid, so it is the same run and never runs twice.  Each spec carries its point
(``RunSpec.grid``) and whether it is that plain run (``grid_plain``); its record does too.

A key is a full config key (``TRAINER.MMADAPTER.ADAPTER_START``).  Keys of a method's node
(``TRAINER.<NODE>.*``) apply to the methods with that node only: the other methods of the
command run once, without the grid.  Keys that do not change a number (``SPEED.*``,
``DATALOADER.NUM_WORKERS``, ...) and keys the protocol sets (dataset, shots, seed,
backbone) are refused with the option to use instead, as are unknown keys and values of
the wrong type, before anything runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

from benchmark import config as C
from benchmark.protocols import RunSpec, changes_numbers, expand

# keys a protocol sets for every run, with the option that chooses them instead
_PROTOCOL_KEYS = {"DATASET.NAME": "--datasets", "DATASET.ROOT": "--root", "DATASET.NUM_SHOTS": "--shots",
                  "DATASET.SUBSAMPLE_CLASSES": "--protocol", "SEED": "--seeds", "MODEL.BACKBONE.NAME": "--clip",
                  "TRAINER.NAME": "--methods"}


class GridError(ValueError):
    """A --grid or --reference that cannot be used; the message says why and what to write."""


@dataclass(frozen=True)
class Grid:
    """The axes of a grid, in the order given: (config key, values as written)."""

    axes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.axes]

    def keys_for(self, method: str) -> list[str]:
        """The keys that apply to ``method`` (a method node's keys only to that method)."""
        from methods.registry import get_method

        node = get_method(method).node
        return [key for key in self.keys if not key.startswith("TRAINER.") or key.split(".")[1] == node]

    def points(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """The cartesian product of the values of ``keys``, the first key varying slowest."""
        values = [dict(self.axes)[key] for key in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]

    @property
    def size(self) -> int:
        n = 1
        for _, values in self.axes:
            n *= len(values)
        return n


def _default_cfg():
    from methods.registry import add_method_defaults

    cfg = C.get_cfg_default()
    add_method_defaults(cfg)
    return cfg


def value_at(config, key: str):
    """The value of a dotted key in a config (a yacs node or its plain-dict copy)."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def coerce(key: str, text: str, option: str = "--grid"):
    """``text`` as the typed value ``--opts key text`` would give (``GridError`` when the key
    is unknown or the value has the wrong type)."""
    cfg = _default_cfg()
    try:
        C.merge_opts(cfg, [key, _as_opt(key, text, cfg)], source=f"{option} {key}")
    except C.ConfigError as exc:
        raise GridError(str(exc)) from None
    return value_at(cfg, key)


def _as_opt(key: str, text: str, cfg=None) -> str:
    """The text to merge for a grid value: a whole number for a float key means that number
    (yacs itself would refuse 1 for a key whose default is 0.001)."""
    try:
        if isinstance(value_at(cfg if cfg is not None else _default_cfg(), key), float) and text.lstrip("+-").isdigit():
            return repr(float(text))
    except (KeyError, TypeError):
        pass  # an unknown key: merging says so
    return text


def shown(value) -> str:
    """A grid value as written in tables and labels (floats keep their shortest exact form)."""
    value = value.item() if hasattr(value, "item") else value  # numpy scalars from pandas
    return repr(value) if isinstance(value, float) else str(value)


def point_label(point: dict, short: bool = True) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1] if short else key}={shown(v)}" for key, v in point.items())


def parse_grid(items: Sequence[str]) -> Grid:
    """``["KEY=v1,v2", ...]`` -> a ``Grid``; each key once, each value once."""
    axes: list[tuple[str, tuple[str, ...]]] = []
    for item in items:
        key, sep, values = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise GridError(f"--grid {item!r}: write KEY=VALUE1,VALUE2,..., e.g. "
                            f"--grid TRAINER.MMADAPTER.ADAPTER_START=3,5,7,9")
        listed = tuple(v.strip() for v in values.split(",") if v.strip())
        if not listed:
            raise GridError(f"--grid {item!r} gives no values; e.g. --grid {key}=3,5,7")
        if key in dict(axes):
            raise GridError(f"--grid names {key} twice; give all its values once: --grid {key}=v1,v2,...")
        if len(set(listed)) != len(listed):
            raise GridError(f"--grid {key} lists a value twice ({', '.join(listed)}); each grid point runs once.")
        axes.append((key, listed))
    return Grid(tuple(axes))


def check_grid(grid: Grid, methods: Sequence[str], opts: Sequence[str] = ()) -> None:
    """Refuse, before anything runs: unknown keys, values of the wrong type, keys that do not
    change a run's numbers or that the protocol sets, keys given in --opts too, and keys of
    a method that is not among ``methods``."""
    from methods.registry import get_method

    nodes = {get_method(m).node: m for m in methods}
    given = set(list(opts)[::2])
    for key, values in grid.axes:
        if key in _PROTOCOL_KEYS:
            raise GridError(f"--grid {key}: the protocol sets this key for every run; use {_PROTOCOL_KEYS[key]} "
                            f"to choose it.")
        if not changes_numbers(key):
            raise GridError(f"--grid {key}: this key does not change a run's numbers (it is not part of a run's "
                            f"identity), so every grid point would be the same run. Use --opts {key} VALUE.")
        for text in values:  # unknown keys and values of the wrong type
            value = coerce(key, text)
            if isinstance(value, (list, tuple, dict)) or value is None:
                raise GridError(f"--grid {key}: a grid takes keys of single values (numbers, strings, "
                                f"True/False); {key} holds {type(value).__name__} values.")
        if key.startswith("TRAINER.") and key.split(".")[1] not in nodes:
            owner = next((name for name in _method_names() if get_method(name).node == key.split(".")[1]), None)
            raise GridError(f"--grid {key}: an option of {owner or 'no registered method'}, which is not among "
                            f"--methods ({', '.join(methods)})." + (f" Add --methods {owner}." if owner else ""))
        if key in given:
            raise GridError(f"--grid {key}: the key is also given in --opts; leave it in one of them.")


def _method_names() -> list[str]:
    from methods.registry import list_methods

    return list_methods()


def expand_grid(grid: Grid, protocol: str, *, methods: Sequence[str], opts: Sequence[str] = (),
                **common) -> list[RunSpec]:
    """The run specs of ``protocols.expand`` for every grid point: per method, the points of
    the keys that apply to it (none: its plain runs), each spec with its point (the typed
    values of its resolved config) and whether it is the run of the same command without
    the grid."""
    plain = expand(protocol, methods=methods, opts=opts, **common)
    if not grid.axes:
        return plain
    plain_ids = {spec.run_id for spec in plain}
    specs: list[RunSpec] = []
    for method in methods:
        keys = grid.keys_for(method)
        if not keys:
            specs += [spec for spec in plain if spec.method == method]
            continue
        for point in grid.points(keys):
            extra = [item for key in keys for item in (key, _as_opt(key, point[key]))]
            for spec in expand(protocol, methods=[method], opts=[*opts, *extra], **common):
                spec.grid = {key: value_at(spec.config, key) for key in keys}
                spec.grid_plain = spec.run_id in plain_ids
                specs.append(spec)
    return specs


# -- references: a grid point or a method --------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """What ``--reference`` names: a method (ordinary tables) or a (partial) grid point."""

    text: str
    method: str | None = None
    point: dict = field(default_factory=dict)


def parse_reference(text: str | None, keys: Sequence[str] = ()) -> Reference | None:
    """``mma`` -> a method; ``KEY=VALUE[,KEY2=VALUE2]`` -> a grid point (``KEY`` may be the
    last part of a grid key, e.g. ADAPTER_START=5, when it names one of ``keys`` alone)."""
    if not text:
        return None
    if "=" not in text:
        from methods.registry import get_method

        return Reference(text, method=get_method(text.strip()).name)
    point = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise GridError(f"--reference {text!r}: write a method name (--reference coop) or a grid point "
                            f"KEY=VALUE, e.g. --reference TRAINER.MMADAPTER.ADAPTER_START=5")
        matches = [k for k in keys if k == key] or [k for k in keys if k.rsplit(".", 1)[-1] == key]
        if len(matches) > 1:
            raise GridError(f"--reference {key} matches several grid keys ({', '.join(matches)}); write the full key.")
        full = matches[0] if matches else key
        if keys and full not in keys:
            raise GridError(f"--reference {key}: not a key of the grid ({', '.join(keys) or 'none'}).")
        point[full] = coerce(full, value, "--reference")
    return Reference(text, point=point)
