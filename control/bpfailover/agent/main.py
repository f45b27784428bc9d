"""failoverd's command line: `failoverd [--config PATH] [--netns NAME]`."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable

from bpfailover import netns
from bpfailover.agent import loop
from bpfailover.agent.loop import Agent, AgentError
from bpfailover.datapath.loader import LoadError
from bpfailover.datapath.maps import DatapathError
from bpfailover.model import config as configmod
from bpfailover.ops.cli import DefaultsHelp
from bpfailover.ops.eventlog import fatal, setup_logging


def _args(argv: list[str] | None) -> argparse.Namespace:
    assert loop.__doc__ is not None
    ap = argparse.ArgumentParser(
        prog="failoverd", description=loop.__doc__.splitlines()[0], formatter_class=DefaultsHelp
    )
    ap.add_argument(
        "--config", help="YAML config (default: $BPFAILOVER_CONFIG or /etc/bpfailover/config.yaml)"
    )
    ap.add_argument(
        "--netns",
        help="run in this named network namespace (labs, tests); unlike `ip netns exec` "
        "it keeps the host's /sys/fs/bpf and its pins",
    )
    return ap.parse_args(argv)


def main(
    argv: list[str] | None = None, make_agent: Callable[[configmod.Config], Agent] = Agent
) -> int:
    """failoverd; `make_agent` builds the Agent (bench/traced_agent.py passes traced parts)."""
    args = _args(argv)
    try:
        source = configmod.config_path(args.config)
        cfg = configmod.load_config(source)
        configmod.check_host(cfg, str(source))
    except configmod.ConfigError as e:
        for line in str(e).splitlines():  # one line per problem
            print(f"failoverd: {line}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level)
    if os.geteuid() != 0:
        return fatal("needs root (CAP_BPF, CAP_NET_ADMIN)", 1)
    if args.netns:
        try:
            netns.enter_for_good(args.netns)
        except OSError as e:
            return fatal(f"netns {args.netns}: {e.strerror}", 1)
    agent = make_agent(cfg)
    agent.load_config = lambda: configmod.load_config(source)  # SIGHUP
    return _serve(agent, cfg)


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler does nothing: the signal's number went down the loop's
    wake-up pipe (set_wakeup_fd), and the loop acts on it between events."""


def _serve(agent: Agent, cfg: configmod.Config) -> int:
    signal.set_wakeup_fd(agent.signal_fd(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _ignore)  # SIGHUP reloads, never kills
    try:
        agent.start()
        from bpfailover.ops import metrics

        # its thread keeps normal scheduling
        agent.exporter = metrics.serve(agent, cfg.metrics.address)
        agent.ready()  # systemd: READY=1 now that every failover device forwards
        agent.go_realtime()
        agent.run()
    except (AgentError, DatapathError, LoadError) as e:
        return fatal(str(e), 1)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return fatal(f"address in use: {e}", 1)
        raise
    finally:
        signal.set_wakeup_fd(-1)
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
