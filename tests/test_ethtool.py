"""The ethtool ioctls answer for the caller's netns, and name what they could not do."""

from __future__ import annotations

import pytest

from bpfailover import netns
from bpfailover.effects.ethtool import driver_of, link_speed, set_gro

pytestmark = pytest.mark.root


def _gro(ns: str, dev: str) -> str:
    out = netns.run_in(ns, ["ethtool", "-k", dev]).stdout
    return next(
        ln.split(":")[1].strip() for ln in out.splitlines() if ln.startswith("generic-receive")
    )


def test_driver_and_gro_on_a_veth_in_a_netns(scratch_netns: str) -> None:
    netns.run_in(scratch_netns, ["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"])
    with netns.entered(scratch_netns):
        assert driver_of("va") == "veth"
        assert driver_of("lo") is None  # loopback has no driver info
        assert driver_of("nosuchdev0") is None  # gone meanwhile: no answer, no exception
        set_gro("va", False)
        off = _gro(scratch_netns, "va")
        set_gro("va", True)
        on = _gro(scratch_netns, "va")
        with pytest.raises(OSError):
            set_gro("nosuchdev0", True)
    assert (off, on) == ("off", "on")
    assert driver_of("va") is None  # the ioctl asks our own netns, where there is no va


def test_link_speed_of_a_veth_and_of_what_has_none(scratch_netns: str) -> None:
    netns.run_in(scratch_netns, ["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"])
    with netns.entered(scratch_netns):
        assert link_speed("va") == (10000, "full")  # what `ethtool va` says for a veth
        assert link_speed("lo") == (None, None)  # no ethtool link settings at all
        assert link_speed("nosuchdev0") == (None, None)  # gone meanwhile: no exception
