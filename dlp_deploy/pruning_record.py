"""pruning.json, read through one adapter: records of schema 1 counted N in "N:M" as the weights pruned; schema 2
counts the weights kept, as the DLP paper (Table 15), DominoSearch and NVIDIA's 2:4 do. An old record is converted
on read (pattern, per-layer n), the conversion is written into the record (`converted`), and it is checked
against the sparsity the record itself measured, so that a record that fits neither meaning is refused."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError
from .io import read_json_record

FILE = "pruning.json"
SCHEMA = "dlp-deploy/pruning/2"
OLD_SCHEMA = "dlp-deploy/pruning/1"
_FIXED = re.compile(r"(\d+):(\d+)")


def read_pruning_record(folder) -> dict | None:
    """A folder's pruning.json in today's meaning, or None when it has none."""
    path = Path(str(folder)) / FILE
    record = read_json_record(path)
    if record is None or record.get("schema") == SCHEMA:
        return record
    if record.get("schema") not in (OLD_SCHEMA, None):
        raise UserError(f"{path} has schema {record.get('schema')!r}, which this version does not read; "
                        "re-run the prune")
    return convert_pruned_counts(record, path)


def _kept_pattern(text: str) -> str:
    fixed = _FIXED.fullmatch(text or "")
    return text if fixed is None else f"{int(fixed.group(2)) - int(fixed.group(1))}:{fixed.group(2)}"


def convert_pruned_counts(record: dict, path: Path) -> dict:
    """Schema 1 -> 2: 'a:b' becomes '(b-a):b', each layer's n becomes m - n; other forms are unchanged."""
    settings = dict(record.get("settings") or {})
    old = settings.get("pattern") or "unstructured"
    new = _kept_pattern(old)
    layers = [dict(layer, n=int(layer["m"]) - int(layer["n"])) if "n" in layer and "m" in layer else layer
              for layer in record.get("layers") or []]
    if "pattern" in settings:
        settings["pattern"] = new
    out = {**record, "schema": SCHEMA, "settings": settings, "layers": layers}
    if isinstance(record.get("pattern"), dict):
        out["pattern"] = {**record["pattern"], "pattern": _kept_pattern(record["pattern"].get("pattern"))}
    if new != old or any("n" in layer for layer in layers):
        _check_against_measured(out, path)
        out["converted"] = {"from_schema": OLD_SCHEMA, "n_counted": "pruned", "pattern_before": old}
    return out


def _check_against_measured(record: dict, path: Path) -> None:
    """The converted counts must give the sparsity the prune measured (each layer's realised share, to a group)."""
    for layer in record["layers"]:
        if "n" in layer and "realized" in layer:
            m = int(layer["m"])
            if abs(layer["realized"] - (m - layer["n"]) / m) > 0.5 / m:
                raise UserError(f"{path} (schema 1) lists layer {layer.get('index')} as {layer['n']} kept of {m} "
                                f"but measured {layer['realized']:.3f} sparse; its N:M meaning is unclear, re-run "
                                "the prune")
    fixed = _FIXED.fullmatch(record["settings"].get("pattern") or "")
    if fixed and "global_sparsity" in record:
        n, m = int(fixed.group(1)), int(fixed.group(2))
        if abs(record["global_sparsity"] - (m - n) / m) > 0.5 / m:
            raise UserError(f"{path} (schema 1) records --pattern {record['settings']['pattern']} (converted) but "
                            f"{record['global_sparsity']:.3f} sparsity; its N:M meaning is unclear, re-run the prune")
