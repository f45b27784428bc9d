"""SIGHUP: the config read again; what can change while running is applied live.

Live: each group's policy and notify settings, metrics.listen, log.level.  Anything else
changed refuses the whole reload with one line naming the keys (restart failoverd for
those); a config that does not load is refused the same way.  Never stops the agent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bpfailover import policy
from bpfailover.model import config as configmod
from bpfailover.ops.eventlog import event

if TYPE_CHECKING:
    from bpfailover.agent.loop import Agent


def reload(agent: Agent) -> None:
    """Read the config again and apply what can change live: each group's policy and
    notify settings, metrics.listen, log.level.  Anything else changed refuses the whole
    reload with one line naming the keys (restart failoverd for those); a config that
    does not load is refused the same way.  Never stops the agent."""
    if agent.load_config is None:
        event("reload_refused", why="no config file to read again (--lab)")
        return
    try:
        new = agent.load_config()
        configmod.check_host(new)
    except configmod.ConfigError as e:
        event("reload_refused", error=str(e).replace("\n", "; "), action="config unchanged")
        return
    fixed = configmod.fixed_changes(agent.cfg, new)
    if fixed:
        event(
            "reload_refused",
            keys=fixed,
            why="cannot change while running: restart failoverd",
            action="config unchanged",
        )
        return
    old, agent.cfg = agent.cfg, new
    changed = configmod.live_changes(old, new)
    assert agent.switch is not None
    for gnew in new.groups:
        grp = agent.groups.get(gnew.name)
        if grp is None:  # torn down meanwhile
            continue
        grp.cfg = gnew
        grp.pcfg = policy.PolicyConfig.from_settings(gnew.policy)
        assert agent.wiring is not None
        agent.wiring.set_dp_hold(grp.gid, gnew.policy.downdelay_ms > 0)
        agent.guard(
            "reload",
            agent.switch.decide,
            grp,
            agent.clock.monotonic_ns(),
            "reload",
            group=grp.name,
        )
    if new.log.level != old.log.level:
        logging.getLogger().setLevel(new.log.level.upper())
    if new.metrics.listen != old.metrics.listen:
        _restart_metrics(agent, new.metrics.address)
    event("reloaded", changed=changed)


def _restart_metrics(agent: Agent, address: tuple[str, int] | None) -> None:
    from bpfailover.ops import metrics

    if agent.exporter is not None:
        agent.exporter.stop()
        agent.on_switch = agent.exporter.prev_on_switch
        agent.exporter = None
    agent.exporter = metrics.serve(agent, address)
