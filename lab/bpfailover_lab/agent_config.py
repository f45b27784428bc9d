"""The config of a lab's own agent: `failover-lab up` writes it, `down` removes it.

Its control socket and pins are derived from the prefix, so two labs, or a lab beside a
real agent, never share them; failoverd reads it like any other config (`--config`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path

from bpfailover.model import config as configmod

RUN_DIR = Path("/run/bpfailover")

CONFIG_YAML = """\
# failover-lab's agent: guest with standby ens10nsby and a VF-like primary (ens11).
# Socket and pins are the lab's own ({prefix}), never a real agent's.
groups:
  - name: ens10
    standby: ens10nsby
    primary: auto
metrics:
  listen: "127.0.0.1:9617"
control:
  socket: {socket}
bpffs: {pins}
"""


def config_dir(prefix: str) -> Path:
    return RUN_DIR / f"lab-{prefix}"


def config_path(prefix: str) -> Path:
    """Where `failover-lab up --prefix PREFIX` writes its agent's config."""
    return config_dir(prefix) / "config.yaml"


def socket_path(prefix: str) -> str:
    return str(RUN_DIR / f"lab-{prefix}.sock")


def pins_path(prefix: str) -> Path:
    return Path(f"/sys/fs/bpf/bpfailover-lab-{prefix}")


def config_text(prefix: str) -> str:
    return CONFIG_YAML.format(prefix=prefix, socket=socket_path(prefix), pins=pins_path(prefix))


def agent_config(prefix: str) -> configmod.Config:
    """The parsed config (what failoverd will run with)."""
    return configmod.parse_config(config_text(prefix), str(config_path(prefix)))


def _dir_0755(d: Path) -> None:
    # failoverd wants its socket's directory root's and not group/world-writable: make
    # /run/bpfailover as it would, whatever the umask.
    if not d.is_dir():
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)


def write_config(prefix: str) -> Path:
    path = config_path(prefix)
    _dir_0755(RUN_DIR)
    _dir_0755(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_text(prefix))
    os.chmod(tmp, 0o644)
    tmp.replace(path)
    return path


def remove_config(prefix: str) -> None:
    """Never raises (like Lab.down)."""
    with suppress(OSError):
        shutil.rmtree(config_dir(prefix))
