"""Prometheus exporter (placeholder until the operators' surface lands)."""

from __future__ import annotations

from typing import Any


def serve(agent: Any, address: tuple[str, int] | None) -> None:
    return None
