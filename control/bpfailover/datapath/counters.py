"""The datapath's counters attached to a status snapshot: read when asked (a status request,
a scrape), from the per-CPU maps summed over CPUs, never frozen into the snapshot."""

from __future__ import annotations

from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.datapath.layout_gen import FO_DIR_RX, FO_DIR_TX, names
from bpfailover.datapath.maps import Datapath
from bpfailover.model.status import (
    AgentStatus,
    Fallback,
    GroupStatus,
    LowerCounters,
    LowerStatus,
)

# Where the programs count drops (bpf/failover_tc.c, failover_xdp.c): egress only when no
# lower is usable; a lower's ingress (TC, and XDP on the xdp receive path) the inactive
# lower's frames its `inactive_rx` rule drops and our own frames flooded back by the switch.
DROP_REASONS = {
    "no_lower": "no usable lower: a frame the guest sent through the failover device dropped",
    "inactive_rx": "a frame received on a lower, dropped as the group's `inactive_rx` rule says "
    "(`drop_standby`: the standby's while a primary is registered; `drop_inactive`: the lower "
    "that is not active)",
    "loop": "a frame with the group's own source MAC arriving on a lower: one we sent that the "
    "switch flooded back (normal in small numbers, e.g. broadcasts); never handed to the guest",
}


def possible_drops(rx_path: str, inactive_rx: str) -> list[tuple[str, str]]:
    """The (hook, reason) pairs a group's programs can count: only those are reported."""
    ingress = ["tc_ingress", *(["xdp"] if rx_path == "xdp" else [])]
    reasons = [*(["inactive_rx"] if inactive_rx != "deliver" else []), "loop"]
    return [("tc_egress", "no_lower"), *((h, r) for h in ingress for r in reasons)]


def read(st: AgentStatus, dp: Datapath) -> AgentStatus:
    """`st` with every lower's packet/byte counters and every group's drops as they are now.
    Reads only: safe from any thread, through the agent's map handles or the exporter's own."""
    hooks, reasons = names("FO_HOOK_"), names("FO_DROP_")

    def lower(g: GroupStatus, lw: LowerStatus) -> LowerCounters:
        assert g.gid is not None  # the agent's own snapshot always has it
        slot = ROLE_SLOTS[lw.role]
        tx = dp.stats(g.gid, slot, FO_DIR_TX)
        rx = dp.stats(g.gid, slot, FO_DIR_RX)
        return LowerCounters(
            tx_packets=tx.packets, tx_bytes=tx.bytes, rx_packets=rx.packets, rx_bytes=rx.bytes
        )

    def drops(g: GroupStatus) -> dict[str, int]:
        assert g.gid is not None
        return {
            f"{hook}/{reason}": dp.drops(g.gid, hooks.index(hook), reasons.index(reason)).packets
            for hook, reason in possible_drops(g.rx_path, g.inactive_rx)
        }

    def fallback(g: GroupStatus) -> tuple[Fallback, ...]:
        assert g.gid is not None
        return tuple(
            Fallback(
                from_role=f["from"],
                to_role=f["to"],
                tx_packets=f["tx_packets"],
                rx_packets=f["rx_packets"],
            )
            for f in dp.fallback_summary(g.gid)
        )

    return st.with_counters(lower, drops, fallback, dp.datapath_check())
