"""Running the checks and printing them: `failoverctl doctor`."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from bpfailover.model import config as configmod
from bpfailover.model.status import AgentStatus, StatusFormatError
from bpfailover.ops import api
from bpfailover.ops.doctor.agents import (
    check_agent_netns,
    check_agents,
    check_datapath_check,
    check_orphaned_pins,
)
from bpfailover.ops.doctor.cloud import (
    check_cloud_init,
    check_failover_devices,
    check_kernel_failover,
    check_netplan_mac_match,
)
from bpfailover.ops.doctor.host import (
    PERMISSION_FIX,
    Finding,
    Host,
    LinkInfo,
    describe_netns,
    dump_links,
    find_lowers,
    host_for,
    present,
)
from bpfailover.ops.doctor.lowers import (
    check_addresses,
    check_bypassed_qdisc,
    check_dhcp,
    check_managers,
    check_masters,
)
from bpfailover.ops.doctor.system import (
    check_bpffs,
    check_headers,
    check_neighbour_knobs,
    check_privileges,
    check_realtime,
    check_sysctl_net,
)


def run_checks(
    host: Host,
    cfg: configmod.Config | None,
    sock: str | None,
    links: dict[int, LinkInfo] | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    status = None
    denied = False
    if sock is not None:
        try:
            reply = api.request(sock, {"cmd": "status"}, timeout=2.0)
            status = AgentStatus.from_json(reply.get("status")) if reply.get("ok") else None
            # the agent's own refusal (SO_PEERCRED): a socket file anyone may open
            denied = not reply.get("ok") and "permission denied" in str(reply.get("error"))
        except api.AgentUnreachable as e:
            denied = e.errno in (errno.EACCES, errno.EPERM)
        except (api.ReplyError, StatusFormatError):
            status = None  # then the lowers are found by the config
        if denied:
            findings.append(
                Finding(
                    "control-socket",
                    sock,
                    "permission denied: the running agent's lowers and state were not checked",
                    PERMISSION_FIX,
                )
            )
    if links is None:
        try:
            links = dump_links(host.netns)
        except OSError as e:
            where = f"network namespace {host.netns}" if host.netns else "the links"
            problem = (
                f"permission denied: cannot enter {where}"
                if e.errno in (errno.EACCES, errno.EPERM)
                else f"cannot list links: {e.strerror or e}"
            )
            findings.append(Finding("links", host.netns or "host", problem, "run as root"))
            links = {}
    elsewhere = list(check_agent_netns(host, status))
    findings.extend(elsewhere)
    # an agent in another namespace: its ifindexes mean other devices here
    lowers = find_lowers(cfg, links, None if elsewhere else status)
    pin_dir = cfg.bpffs if cfg is not None else "/sys/fs/bpf/bpfailover"
    checks: Iterable[Iterable[Finding]] = (
        check_addresses(lowers),
        check_dhcp(host, lowers),
        check_managers(host, lowers),
        check_masters(lowers, links),
        check_bpffs(host, pin_dir),
        check_headers(host),
        check_datapath_check(host, status),
        check_privileges(host),
        check_realtime(host, cfg),
        check_neighbour_knobs(host),
        check_sysctl_net(host),
        check_agents(host, pin_dir, sock, denied),
        check_orphaned_pins(host, host.netns),
        check_kernel_failover(host, links),
        check_cloud_init(host, lowers),
        check_failover_devices(host, cfg, links),
        check_netplan_mac_match(host, cfg, links),
        check_bypassed_qdisc(cfg, links),
    )
    for found in checks:
        findings.extend(found)
    return findings


def format_findings(findings: list[Finding]) -> str:
    if not findings:
        return "doctor: no problems found"
    out = []
    for f in findings:
        out.append(f"[{f.check}] {f.subject}: {f.problem}\n    fix: {f.fix}")
    out.append(f"doctor: {len(findings)} finding{'s' if len(findings) != 1 else ''}")
    return "\n".join(out)


def main_for_cli(args: argparse.Namespace, cli_socket: str | None) -> int:
    """`failoverctl doctor`: 0 when nothing is found, 4 when something is, 2 on a bad config."""
    netns_name_ = args.netns
    cfg: configmod.Config | None = None
    pre: list[Finding] = []
    path = configmod.config_path(args.config)
    try:
        cfg = configmod.load_config(path)
    except configmod.ConfigError as e:
        if args.config or os.environ.get(configmod.CONFIG_ENV) or present(path):
            for line in str(e).splitlines():
                print(f"failoverctl: {line}", file=sys.stderr)
            return 2
        pre.append(
            Finding(
                "config",
                str(path),
                "no agent config: lowers are guessed only from a running agent",
                f"write {path} (keys: {configmod.REFERENCE}), or give the agent's: "
                "failoverctl --config FILE doctor",
            )
        )
    sock = cli_socket or (cfg.control.socket if cfg else "/run/bpfailover/control.sock")
    host = host_for(netns_name_)
    if cfg is not None:
        host.bpffs = Path(cfg.bpffs).parent  # where this config's pins live
    findings = pre + run_checks(host, cfg, sock)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        print(f"doctor: checking {describe_netns(host)}")
        print(format_findings(findings))
    return 4 if findings else 0
