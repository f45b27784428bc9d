"""What a reload (SIGHUP) changes: the differing key paths, split into those a running
agent takes and those that need a restart."""

from __future__ import annotations

import re
from typing import Any

from bpfailover.model.config.schema import Config

# What SIGHUP may change in a running agent (paths below these); the rest needs a restart.
LIVE_KEYS = ("groups[].policy", "groups[].notify", "metrics", "log")


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(path)


def changes(old: Config, new: Config) -> list[str]:
    """Key paths whose value differs, e.g. ['groups[0].policy.updelay_ms', 'bpffs']."""
    out: list[str] = []
    _diff(old.to_dict(), new.to_dict(), "", out)
    return out


def _is_live(path: str) -> bool:
    generic = re.sub(r"\[\d+\]", "[]", path)
    return any(generic == k or generic.startswith(k + ".") for k in LIVE_KEYS)


def live_changes(old: Config, new: Config) -> list[str]:
    return [p for p in changes(old, new) if _is_live(p)]


def fixed_changes(old: Config, new: Config) -> list[str]:
    """What differs that a running agent cannot take (groups added or removed, names,
    lowers, MAC, receive path, socket, pins, scheduling)."""
    return [p for p in changes(old, new) if not _is_live(p)]
