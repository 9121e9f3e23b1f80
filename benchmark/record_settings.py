"""Which table row each record belongs to: one computation per row.

Records that differ in their run identity (``benchmark.protocols.identity_payload``) in
anything but the seed are different computations: two backbones, two learning rates, two
versions of a method.  ``split_settings`` compares the records of each method, cell by cell
(dataset and shots, and an ablation's grid point), and where two settings meet it labels
every record of that method with the values that tell them apart (``zsclip
[backbone=RN50]``), so that the tables (``benchmark.tables``), the ablation tables, the
``--reference`` comparisons and the rank agreement show one row per setting instead of
averaging them.  Two records that cannot be told apart by anything stored raise
``SettingsError`` naming both files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import pandas as pd

from benchmark import records as R

class SettingsError(ValueError):
    """Records of one table cell that can neither be averaged together nor told apart."""


# identity keys that never depend on the dataset or the shots: a row with two values of one of
# them mixes two models (or two versions of a method), even when no cell does
MODEL_KEYS = ("backbone_id", "method_version")
# what a label shows for a key that a record made by an older version does not hold
UNKNOWN = "?"
_CELL_KEYS = ("method", "protocol", "dataset", "shots", "seed")  # the table's own keys


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _token(value):
    """A hashable stand-in for a value (lists and objects as their JSON text)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _fallback_payload(record: dict) -> dict:
    """``identity_payload`` for a record whose method is no longer registered (a removed
    plugin): the same fields, the config's own method node kept (``TRAINER.NAME``)."""
    from benchmark.protocols import TRANSFER

    config = json.loads(json.dumps(record.get("config") or {}))
    trainer = config.get("TRAINER") or {}
    config["TRAINER"] = {k: v for k, v in trainer.items() if k in ("NAME", trainer.get("NAME"))}
    return {"method_version": record.get("method_version", 1), "stage": record.get("stage"),
            "subsample": record.get("subsample"), "backbone_id": record.get("backbone_id"),
            "evals": [] if record.get("protocol") == TRANSFER else record.get("evals"), "config": config}


def setting_of(record: dict, drop: Sequence[str] = ()) -> dict:
    """A record's setting: its run identity (``protocols.identity_payload``) without the seed,
    flattened to dotted keys (``backbone_id``, ``config.OPTIM.LR``); ``drop``: config keys left
    out as well (an ablation's grid keys).  A field that a record made by an older version does
    not hold (``backbone_id``, ``evals``, the config or part of it) is absent: unknown, not a value."""
    from benchmark.protocols import changes_numbers, identity_payload

    filled = {"evals": [], "config": {}, "stage": None, "subsample": None, "backbone_id": None, **record}
    try:
        payload = identity_payload(filled)
    except (ValueError, KeyError, TypeError, AttributeError):  # an unregistered method, an odd record
        payload = _fallback_payload(filled)
    config = payload.pop("config", None) or {}
    flat = {k: v for k, v in _flatten(payload).items() if k not in _CELL_KEYS}
    for key in ("stage", "subsample", "backbone_id", "evals"):
        if record.get(key) is None:
            flat.pop(key, None)
    dropped = ("SEED", *drop)
    for key, value in _flatten(config).items():
        if changes_numbers(key) and not any(key == d or key.startswith(d + ".") for d in dropped):
            flat[f"config.{key}"] = value
    return flat


@dataclass
class Settings:
    """The row of each record: its label (the method name, and the setting when the
    method's records are split into rows) and the setting alone (``backbone=RN50``; "" when
    not split); ``notes``: {(world, record protocol, method): what split it}."""

    rows: dict = field(default_factory=dict)  # id(record) -> (label, setting)
    notes: dict = field(default_factory=dict)

    def row(self, record: dict) -> tuple[str, str]:
        return self.rows.get(id(record), (record["method"], ""))

    def notes_for(self, world: str, protocol: str, methods: Iterable[str]) -> list[str]:
        """The notes of the methods (registered names) of one table."""
        methods = set(methods)
        return [text for (w, p, m), text in self.notes.items() if w == world and p == protocol and m in methods]


def _cell(record: dict, point: Callable | None) -> tuple:
    return (record["dataset"], record["shots"], point(record) if point else ())


def _split_keys(members: list[dict], settings: list[dict], point: Callable | None) -> list[str]:
    """The identity keys with more than one known value in a cell of these records (one
    method), and the model keys with more than one anywhere: what tells their settings apart."""
    values: dict[tuple, set] = {}
    for record, setting in zip(members, settings):
        cell = _cell(record, point)
        for key, value in setting.items():
            values.setdefault((cell, key), set()).add(_token(value))
            if key in MODEL_KEYS:
                values.setdefault(("everywhere", key), set()).add(_token(value))
    found = {key for (_, key), seen in values.items() if len(seen) > 1}
    order = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in MODEL_KEYS if k in found] + [k for k in order if k in found and k not in MODEL_KEYS]


def _key_names(keys: list[str]) -> dict[str, str]:
    """Readable names of the keys of a label: ``backbone``, ``version``, config keys by
    their last part (two for ``...NAME``) or as many as tell them apart."""
    names = {"backbone_id": "backbone", "method_version": "version"}
    config = [k for k in keys if k.startswith("config.")]
    out = {}
    for key in keys:
        if key not in config:
            out[key] = names.get(key, key)
            continue
        parts = key.split(".")[1:]
        size = 2 if parts[-1] == "NAME" and len(parts) > 1 else 1
        while size < len(parts) and any(other != key and other.split(".")[1:][-size:] == parts[-size:]
                                        for other in config):
            size += 1
        out[key] = ".".join(parts[-size:])
    return out


def _shown_value(value) -> str:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value) if isinstance(value, float) else str(value)


def _label_values(members: list[dict], settings: list[dict], keys: list[str]) -> list[list[str]]:
    """Per record, its values of ``keys`` as shown: the backbone by the record's own name for
    it (``backbone``) where that name stands for one set of weights here, else by its id."""
    ids_of_name: dict = {}
    names_of_id: dict = {}
    for record, setting in zip(members, settings):
        if "backbone_id" in setting:
            ids_of_name.setdefault(record.get("backbone"), set()).add(setting["backbone_id"])
            names_of_id.setdefault(setting["backbone_id"], set()).add(record.get("backbone"))
    by_name = None not in ids_of_name and all(len(v) == 1 for v in [*ids_of_name.values(), *names_of_id.values()])
    out = []
    for record, setting in zip(members, settings):
        shown = []
        for key in keys:
            if key not in setting:
                shown.append(UNKNOWN)
            elif key == "backbone_id" and by_name:
                shown.append(str(record["backbone"]))
            else:
                shown.append(_shown_value(setting[key]))
        out.append(shown)
    return out


def _record_name(record: dict) -> str:
    path = record.get("_path")
    if path:
        return str(path)
    return (f"records/{record['method']}/{record['protocol']}/{record['dataset']}/"
            f"shots{record['shots']}-seed{record['seed']}-{record.get('id', '?')}.json")


def _differences(a: dict, b: dict) -> str:
    keys = [k for k in dict.fromkeys([*a, *b]) if _token(a.get(k, UNKNOWN)) != _token(b.get(k, UNKNOWN))]
    return "; ".join(f"{k}: {_shown_value(a[k]) if k in a else 'not stored'} / "
                     f"{_shown_value(b[k]) if k in b else 'not stored'}" for k in keys[:4]) + (
        " ..." if len(keys) > 4 else "")


def split_settings(records: Iterable[dict], *, drop: Sequence[str] = (), point: Callable | None = None) -> Settings:
    """Which row each record belongs to, so that no row or cell holds two computations.

    Per world, protocol and method, the records' settings (``setting_of``) are compared in
    each cell (dataset and shots; ``point``: a function of a record adding the grid point of
    an ablation); the model keys (``MODEL_KEYS``) across all cells.  Where a key has two
    known values, every record of that method is labelled by its values of the keys that
    differ (``zsclip [backbone=RN50]``, ``coop [LR=0.002]``; ``?`` where a record made by an
    older version does not hold the key), and the method shows one row per label.  When
    nothing differs (the usual case) nothing is labelled.  Two records of one row, cell and
    seed that are not the same computation (one lacks what the other holds, so neither a
    label nor a value tells them apart) raise ``SettingsError`` naming both files."""
    records = [r for r in records if R.is_finished_record(r)]
    result = Settings()
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record.get("world", "real"), record["protocol"], record["method"]), []).append(record)
    for (world, protocol, method), members in groups.items():
        settings = [setting_of(r, drop) for r in members]
        keys = _split_keys(members, settings, point)
        name = "config.MODEL.BACKBONE.NAME"
        if "backbone_id" in keys and name in keys:
            names_of_id: dict = {}
            for s in settings:
                if "backbone_id" in s and name in s:
                    names_of_id.setdefault(_token(s["backbone_id"]), set()).add(_token(s[name]))
            if all(len(v) == 1 for v in names_of_id.values()):  # the weights' name: said by the backbone
                keys.remove(name)
        labels = [method] * len(members)
        if keys:
            names = _key_names(keys)
            values = _label_values(members, settings, keys)
            parts = [", ".join(f"{names[k]}={v}" for k, v in zip(keys, shown)) for shown in values]
            labels = [f"{method} [{part}]" for part in parts]
            for record, label, part in zip(members, labels, parts):
                result.rows[id(record)] = (label, part)
            unknown = any(UNKNOWN in shown for shown in values)
            result.notes[(world, protocol, method)] = (
                f"{method}: records of {len(set(labels))} settings ({', '.join(names[k] for k in keys)}) are shown "
                "as separate rows" + (f" ('{UNKNOWN}': not stored by the older records)" if unknown else "") + ".")
        seen: dict[tuple, tuple[dict, dict]] = {}
        for record, setting, label in zip(members, settings, labels):
            key = (label, _cell(record, point), record["seed"])
            if key not in seen:
                seen[key] = (record, setting)
                continue
            other, other_setting = seen[key]
            if _token(other_setting) != _token(setting):
                raise SettingsError(
                    f"Two records of {method} ({protocol}, {record['dataset']}, {record['shots']} shots, seed "
                    f"{record['seed']}) may be different computations but nothing stored tells them apart: "
                    f"{_record_name(other)} and {_record_name(record)} ({_differences(other_setting, setting)}). "
                    "Move the one made by the older version out of the records folder (or delete it) and build "
                    "the tables again.")
    return result


# -- the settings of a table's rows ----------------------------------------------------------------
def named_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``method_name`` and ``setting`` (a frame made by hand may lack them)."""
    if "method_name" not in frame:
        frame = frame.assign(method_name=frame["method"])
    if "setting" not in frame:
        frame = frame.assign(setting="")
    return frame


def with_setting_columns(table: pd.DataFrame, frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``table[columns]``, with ``method_name`` and ``setting`` after ``method`` when some
    method of the table is split into settings (a table without any keeps its columns)."""
    if not (frame["setting"] != "").any():
        return table[columns]
    info = frame.drop_duplicates("method").set_index("method")
    table = table.assign(method_name=table["method"].map(info["method_name"]),
                         setting=table["method"].map(info["setting"]))
    return table[columns[:1] + ["method_name", "setting"] + columns[1:]]


def with_notes(table: pd.DataFrame, frame: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """``table`` with the notes of its split methods (``settings_notes``), taken from the
    records frame it was made from."""
    notes = frame.attrs.get("settings_notes") or {}
    names = set(method_names(table).values())
    worlds = set(frame["world"]) if "world" in frame else set()
    table.attrs["settings_notes"] = [text for (world, p, method), text in notes.items()
                                     if p == protocol and method in names and world in worlds]
    return table


def settings_notes(table: pd.DataFrame) -> list[str]:
    """What splits the rows of a table into settings, one line per split method; [] when
    no method is split."""
    notes = table.attrs.get("settings_notes")
    if notes is not None:
        return list(notes)
    if "setting" not in table:
        return []
    split = table[table["setting"].fillna("") != ""]
    return [f"{name}: records of {rows['method'].nunique()} settings are shown as separate rows."
            for name, rows in split.groupby("method_name", sort=False)]


def method_names(table: pd.DataFrame) -> dict[str, str]:
    """Row label -> registered method name of a table (the label itself where not split)."""
    if table is None or "method" not in table:
        return {}
    if "method_name" not in table:
        return {m: m for m in table["method"]}
    return dict(zip(table["method"], table["method_name"]))
