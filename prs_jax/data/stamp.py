"""Config stamps: a restartable output remembers the config that decides its rows, and a resume must match it.

    check_stamp(stamp_path(out), {"policy": ..., "strategy": {...}, ...}, resuming=out_has_rows)

The stamp file (`OUT.stamp.json` beside an output file) holds the row-determining config and its hash. A
resume whose config differs is refused with the dotted keys that differ, so rows of two configs never mix in one
file. Settings that change speed but not rows (batch size, process count, output path) are left out by callers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from prs_jax.errors import StampError

__all__ = ["config_hash", "diff_keys", "stamp_path", "read_stamp", "write_stamp", "check_stamp"]


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able config."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested configs (sorted)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(json.loads(json.dumps(old, default=str)), "", a)
    _flatten(json.loads(json.dumps(new, default=str)), "", b)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


def describe_diff(old: Mapping[str, Any], new: Mapping[str, Any], keys: list[str], limit: int = 6) -> str:
    """`key: old -> new` for the first `limit` differing keys."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(json.loads(json.dumps(old, default=str)), "", a)
    _flatten(json.loads(json.dumps(new, default=str)), "", b)
    parts = [f"{k}: {a.get(k, '<unset>')!r:.40} -> {b.get(k, '<unset>')!r:.40}" for k in keys[:limit]]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(parts) + more


def stamp_path(out: str | Path) -> Path:
    """The stamp file of an output file."""
    out = Path(out)
    return out.with_name(out.name + ".stamp.json")


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp at `path` ({"stamp": hash, "config": {...}}), or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StampError(f"{path}: unreadable config stamp ({e}); delete it only if you are sure the output was "
                         "written with this config.") from None
    if not isinstance(data, dict) or "config" not in data:
        raise StampError(f"{path}: not a config stamp (no 'config' key).")
    return data


def write_stamp(path: str | Path, config: Mapping[str, Any]) -> None:
    """Write the stamp of `config` (tmp file + rename, so a kill never leaves half a stamp)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"stamp": config_hash(config), "config": config}, indent=2, sort_keys=True,
                              default=str))
    tmp.replace(path)


def check_stamp(path: str | Path, config: Mapping[str, Any], *, resuming: bool, what: str) -> None:
    """Refuse to resume `what` when its stamp differs from `config` (naming the keys); stamp a fresh output.

    With `resuming` False (no rows yet) the stamp is (re)written. With rows but no stamp (an output of an older
    version) the stamp is written: there is nothing to compare against."""
    path = Path(path)
    config = json.loads(json.dumps(config, default=str))
    old = read_stamp(path) if resuming else None
    if old is not None:
        keys = diff_keys(old["config"], config)
        if keys:
            detail = describe_diff(old["config"], config, keys)
            raise StampError(
                f"{what}: was written with another config (stamp {old.get('stamp')}, this run "
                f"{config_hash(config)}); differing keys: {', '.join(keys)} ({detail}). Resuming would mix rows of "
                f"two configs: write to another output, restore the old values, or delete {what} and {path.name} to "
                "start over.")
        return
    write_stamp(path, config)
