"""Address lists in a scratch netns: the unicast list (macvlan on top) copied onto a lower
through the FDB "self" entries, removed again when it goes; only our own adds removed."""

from __future__ import annotations

import socket

import pytest

from bpfailover import netns
from bpfailover.effects import mcsync

pytestmark = pytest.mark.root

MV_MAC = "02:00:00:00:aa:01"
OTHER = "02:00:00:00:bb:02"


def _ip(ns: str, *args: str) -> None:
    netns.run_in(ns, ["ip", *args])


def test_unicast_list_of_a_macvlan_synced_and_unsynced(scratch_netns: str) -> None:
    ns = scratch_netns
    _ip(ns, "link", "add", "fo0", "type", "veth", "peer", "name", "fo0_fo")
    _ip(ns, "link", "add", "low0", "type", "veth", "peer", "name", "far0")
    for dev in ("fo0", "fo0_fo", "low0", "far0"):
        _ip(ns, "link", "set", dev, "up")
    _ip(ns, "link", "add", "link", "fo0", "name", "mv0", "address", MV_MAC, "type", "macvlan")
    _ip(ns, "link", "set", "mv0", "up")  # macvlan_open: dev_uc_add(fo0, MV_MAC)
    with netns.entered(ns):
        fo0, low0 = socket.if_nametoindex("fo0"), socket.if_nametoindex("low0")
        assert mcsync.read_uc_lists().get(fo0) == {MV_MAC}
        # someone else's entry on the lower: kept, and never counted as ours
        assert mcsync.uc_add(low0, OTHER)
        added = mcsync.sync_uc(fo0, {low0: "low0"}, {})
        assert added == {low0: {MV_MAC}}
        assert mcsync.read_uc_lists()[low0] == {MV_MAC, OTHER}
        assert mcsync.sync_uc(fo0, {low0: "low0"}, added) == added  # idempotent
    _ip(ns, "link", "del", "mv0")
    with netns.entered(ns):
        added = mcsync.sync_uc(fo0, {low0: "low0"}, added)
        assert added == {low0: set()}
        assert mcsync.read_uc_lists()[low0] == {OTHER}
    out = netns.run_in(ns, ["bridge", "fdb", "show", "dev", "low0", "self"]).stdout
    assert MV_MAC not in out and OTHER in out  # what an operator sees agrees
