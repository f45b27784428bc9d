"""Helpers for tests that drive real traffic through the lab."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfailover import netns
from bpfailover.datapath import layout_gen as L
from bpfailover.datapath.attach import Wiring, set_carrier
from bpfailover.datapath.maps import Datapath
from bpfailover_lab import traffic
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab


def link_stats(ns: str, dev: str) -> dict[str, int]:
    out = netns.run_in(ns, ["ip", "-j", "-s", "link", "show", "dev", dev]).stdout
    s = json.loads(out)[0]["stats64"]
    return {"tx": s["tx"]["packets"], "rx": s["rx"]["packets"]}


def ping(ns: str, addr: str, count: int = 3) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", addr]
    return netns.run_in(ns, argv, check=False, timeout=20).returncode == 0


def neigh(ns: str, addr: str) -> dict[str, Any] | None:
    out = netns.run_in(ns, ["ip", "-j", "neigh", "show", "to", addr]).stdout
    entries = json.loads(out or "[]")
    return entries[0] if entries else None


_TCP_SERVER = textwrap.dedent(
    """
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(20)
    print("ready", flush=True)
    c, _ = s.accept(); c.settimeout(20)
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    """
)


def tcp_echo(
    server_ns: str, server_addr: str, client_ns: str, nbytes: int = 200_000, port: int = 9100
) -> int:
    """Send nbytes over TCP and read them back; returns bytes echoed."""
    srv = subprocess.Popen(
        netns.cmd_in(server_ns, [sys.executable, "-c", _TCP_SERVER, server_addr, str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        client = textwrap.dedent(
            f"""
            import socket, threading
            addr = {server_addr!r}
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            c = socket.create_connection((addr, {port}), timeout=20)
            data = bytes(range(256)) * ({nbytes} // 256)
            t = threading.Thread(target=c.sendall, args=(data,)); t.start()
            got = 0
            while got < len(data):
                d = c.recv(65536)
                if not d:
                    break
                got += len(d)
            t.join(); c.close(); print(got)
            """
        )
        out = netns.run_in(client_ns, [sys.executable, "-c", client], timeout=40).stdout
        return int(out.strip())
    finally:
        srv.kill()
        srv.wait()


@dataclass
class Wired:
    """A lab with the datapath attached by hand (no agent): the map is set by the test."""

    lab: Lab
    dp: Datapath
    groups: list[int]

    def flip(self, i: int, role: str) -> None:
        self.dp.flip(
            self.groups[i],
            {"primary": L.FO_SLOT_PRIMARY, "standby": L.FO_SLOT_STANDBY, "none": 0}[role],
        )

    def stats(self, i: int, role: str, direction: str) -> int:
        slot = L.FO_SLOT_PRIMARY if role == "primary" else L.FO_SLOT_STANDBY
        d = L.FO_DIR_TX if direction == "tx" else L.FO_DIR_RX
        return self.dp.stats(self.groups[i], slot, d).packets


@contextmanager
def wired_lab(
    lab: Lab, pin_dir: Path, rx_path: str = "tc", inactive_rx: str = "deliver"
) -> Iterator[Wired]:
    """Lab up + datapath wired by hand in the guest; everything removed on the way out."""
    from pyroute2 import IPRoute

    lab.up()
    dp: Datapath | None = None
    try:
        dp = Datapath.open(pin_dir)
        groups = []
        with netns.entered(lab.guest):
            ipr = IPRoute()
            try:
                w = Wiring(dp, ipr)
                for i in range(lab.groups):
                    n = lab.names(i)
                    g = w.setup_group(n.failover, n.mac, inactive_rx, rx_path)
                    for role, dev in (("standby", n.standby), ("primary", n.primary)):
                        slot = L.FO_SLOT_STANDBY if role == "standby" else L.FO_SLOT_PRIMARY
                        w.register_lower(g, slot, ipr.link_lookup(ifname=dev)[0], rx_path)
                    dp.flip(g, L.FO_SLOT_PRIMARY)
                    set_carrier(ipr, dp.group(g).peer_ifindex, True)  # the agent's job
                    groups.append(g)
            finally:
                ipr.close()
        for i in range(lab.groups):
            lab.address_failover(i)
        yield Wired(lab, dp, groups)
    finally:
        if dp is not None:
            dp.close()
        lab.down()
        import shutil

        shutil.rmtree(pin_dir, ignore_errors=True)


_TCP_TICKER = textwrap.dedent(
    """
    import socket, sys, time
    addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    c = socket.create_connection((addr, port), timeout=10)
    c.settimeout(10)
    sent = got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.sendall(b"x" * 1024); sent += 1024
        while got < sent:
            got += len(c.recv(65536) or b"")
        time.sleep(0.01)
    c.close(); print(sent, got)
    """
)


class TcpTicker:
    """A TCP connection that exchanges 1 KiB every 10 ms for `seconds`: survives a switch
    or migration only if no segment is lost for good (no reset, no timeout)."""

    def __init__(
        self, server_ns: str, server_addr: str, client_ns: str, seconds: float, port: int = 9200
    ) -> None:
        self.srv = subprocess.Popen(
            netns.cmd_in(server_ns, [sys.executable, "-c", _TCP_SERVER, server_addr, str(port)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.srv.stdout is not None and self.srv.stdout.readline().strip() == "ready"
        argv = [sys.executable, "-c", _TCP_TICKER, server_addr, str(port), str(seconds)]
        self.cli = subprocess.Popen(
            netns.cmd_in(client_ns, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait(self, timeout: float = 60) -> tuple[bool, str]:
        """(survived, detail)."""
        try:
            out, err = self.cli.communicate(timeout=timeout)
        finally:
            self.cli.kill()
            self.srv.kill()
            self.srv.wait()
        if self.cli.returncode != 0:
            return False, err.strip().splitlines()[-1] if err.strip() else "client failed"
        sent, got = map(int, out.split())
        return sent == got and sent > 0, f"sent {sent} echoed {got}"


def start_agent(lab: Lab, **overrides: Any) -> AgentRun:
    """failoverd on an up lab (group settings overridden); cleaned up if start fails."""
    agent = AgentRun(lab, group_overrides=overrides or None)
    try:
        agent.start()
    except BaseException:
        agent.cleanup()
        raise
    return agent


def bring_up(lab: Lab, **overrides: Any) -> AgentRun:
    """Lab up, agent running, guest addressed, ARP and the bridge's fdb warmed up."""
    lab.up()
    agent = start_agent(lab, **overrides)
    try:
        lab.address_failover(0)
        assert ping(lab.guest, lab.names(0).peer_v4)
    except BaseException:
        agent.cleanup()
        raise
    return agent


def stream(lab: Lab, rate: int = 2000, seconds: float = 3.0) -> traffic.StreamHandle:
    """UDP both ways between the guest's failover address and the peer (group 0)."""
    n = lab.names(0)
    return traffic.start_stream(
        lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=rate, duration_s=seconds
    )
