"""Where the agent config is looked for, without importing pydantic (failoverctl's start-up:
it only needs the config when one exists; the import costs seconds in an emulated guest)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/bpfailover/config.yaml")
CONFIG_ENV = "BPFAILOVER_CONFIG"


def config_path(cli_value: str | None) -> Path:
    """The config to load: the command line's, else $BPFAILOVER_CONFIG, else the default."""
    if cli_value:
        return Path(cli_value)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
