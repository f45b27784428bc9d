"""Run failoverd against the lab: for the demo, the tests and the benchmarks.

The agent runs as its own process in the lab's guest namespace (`--netns`, so
it shares the host's /sys/fs/bpf), with a config written for the run: its own
pin directory and control socket, so runs never see each other's state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bpfailover.ops import api
from bpfailover_lab.topology import Lab

BPFFS = Path("/sys/fs/bpf")


class HarnessError(RuntimeError):
    pass


def ensure_bpffs() -> None:
    if subprocess.run(["mountpoint", "-q", str(BPFFS)], check=False).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=700", "bpf", str(BPFFS)], check=True)


class AgentRun:
    """One failoverd process for a lab, with its own pins, socket and log."""

    def __init__(
        self,
        lab: Lab,
        group_overrides: dict[str, Any] | None = None,
        metrics_listen: str | None = None,
        name: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.lab = lab
        self.name = name or lab.prefix
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bpfailover-{self.name}-"))
        self.pin_dir = BPFFS / f"bpfailover-{self.name}"
        self.socket = f"/run/bpfailover/{self.name}.sock"
        self.log_path = self.workdir / "failoverd.log"
        groups = []
        for i in range(lab.groups):
            n = lab.names(i)
            groups.append({"name": n.failover, "standby": n.standby, **(group_overrides or {})})
        self.config = {
            "groups": groups,
            "metrics": {"listen": metrics_listen},
            "control": {"socket": self.socket},
            "bpffs": str(self.pin_dir),
            "log": {"level": "info"},
            **(settings or {}),  # other top-level keys, e.g. scheduling
        }
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_spawn = self.t_ready = 0.0  # monotonic: process started, agent answering

    # -- process --------------------------------------------------------------------------
    module = "bpfailover.agent"  # the entry module (benchmarks run a traced variant)
    cwd: Path | None = None  # where it runs (a module outside the package needs its root)
    poll_s = 0.02

    def start(self, timeout: float = 60.0) -> AgentRun:
        ensure_bpffs()
        argv = self.command(self.lab.guest, self.config_path)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.t_spawn = time.monotonic()
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.cwd
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"failoverd exited {self.proc.returncode}: {self.tail()}")
            try:
                st = self.status()
            except OSError:
                time.sleep(self.poll_s)
                continue
            if len(st["groups"]) == self.lab.groups:
                self.t_ready = time.monotonic()
                return self
        raise HarnessError(f"failoverd did not come up in {timeout}s: {self.tail()}")

    @classmethod
    def command(cls, netns_name: str, config_path: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            cls.module,
            "--netns",
            netns_name,
            "--config",
            str(config_path),
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send `sig` and wait for the exit; its code.  An agent that does not stop within
        `timeout` is killed (nothing is left running) and that is an error, never hidden."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise HarnessError(
                f"failoverd (pid {self.proc.pid}) did not stop within {timeout:g}s of "
                f"{signal.Signals(sig).name}; killed: {self.tail()}"
            ) from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> AgentRun:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the agent, drop its pins; the lab's netns removal takes devices and filters.
        (An agent that would not stop is still reported, after the clean-up.)"""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> AgentRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- talking to it ----------------------------------------------------------------------
    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        return api.request(self.socket, msg)

    def status(self) -> dict[str, Any]:
        reply = self.request({"cmd": "status"})
        if not reply.get("ok"):
            raise HarnessError(f"status failed: {reply}")
        st: dict[str, Any] = reply["status"]
        return st

    def group(self, i: int = 0) -> dict[str, Any]:
        g: dict[str, Any] = self.status()["groups"][self.lab.names(i).failover]
        return g

    def wait_for(self, pred: Any, timeout: float = 10.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(0.02)
        raise HarnessError(f"timed out waiting for {what}; agent log: {self.tail()}")

    def wait_active(self, lower: str | None, i: int = 0, timeout: float = 10.0) -> None:
        self.wait_for(
            lambda: self.group(i)["active_lower"] == lower, timeout, f"active lower {lower}"
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The agent's structured log events (optionally only those called `name`)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            msg = rec.get("msg")
            if isinstance(msg, dict) and (name is None or msg.get("event") == name):
                out.append(msg)
        return out

    def tail(self, n: int = 8) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
