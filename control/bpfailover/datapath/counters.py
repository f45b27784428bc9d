"""The datapath's counters attached to a status snapshot: read when asked (a status request,
a scrape), from the per-CPU maps summed over CPUs, never frozen into the snapshot."""

from __future__ import annotations

from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.datapath.maps import Datapath
from bpfailover.model.status import AgentStatus, GroupStatus, LowerCounters, LowerStatus


def read(st: AgentStatus, dp: Datapath) -> AgentStatus:
    """`st` with every lower's packet/byte counters and every group's drops as they are now.
    Reads only: safe from any thread, through the agent's map handles or the exporter's own."""
    L = dp.L

    def lower(g: GroupStatus, lw: LowerStatus) -> LowerCounters:
        assert g.gid is not None  # the agent's own snapshot always has it
        slot = ROLE_SLOTS[lw.role]
        tx = dp.stats(g.gid, slot, L.FO_DIR_TX)
        rx = dp.stats(g.gid, slot, L.FO_DIR_RX)
        return LowerCounters(
            tx_packets=tx.packets, tx_bytes=tx.bytes, rx_packets=rx.packets, rx_bytes=rx.bytes
        )

    def drops(g: GroupStatus) -> dict[str, int]:
        assert g.gid is not None
        return {
            f"{hook}/{reason}": dp.drops(g.gid, h, r).packets
            for h, hook in enumerate(L.hooks)
            for r, reason in enumerate(L.drop_reasons)
        }

    return st.with_counters(lower, drops)
