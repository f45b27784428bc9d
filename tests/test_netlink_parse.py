"""The lean rtnetlink parser reads what the agent keys on, from the kernel's wire format."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from bpfailover.events import netlink


def _rta(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((-n) % 4)


def _newlink(ifindex: int, name: str, linkinfo: bytes, flags: int = 0, extra: bytes = b"") -> bytes:
    body = struct.pack("=BxHiII", 0, 1, ifindex, 0x1, 0)
    body += _rta(netlink.IFLA_IFNAME, name.encode() + b"\0")
    body += _rta(netlink.IFLA_LINK, struct.pack("=i", 7))
    body += _rta(netlink.IFLA_LINKINFO, linkinfo)
    body += extra
    return struct.pack("=IHHII", 16 + len(body), netlink.RTM_NEWLINK, flags, 0, 0) + body


def _done(flags: int = 0) -> bytes:
    return struct.pack("=IHHIIi", 20, netlink.NLMSG_DONE, flags, 0, 0, 0)


def test_vlan_id_and_protocol_of_a_vlan_link() -> None:
    data = _rta(netlink.IFLA_VLAN_ID, struct.pack("=H", 100))
    data += _rta(netlink.IFLA_VLAN_PROTOCOL, struct.pack("!H", 0x88A8))
    info = _rta(netlink.IFLA_INFO_KIND, b"vlan\0") + _rta(netlink.IFLA_INFO_DATA, data)
    (link,), _ = netlink.parse(_newlink(9, "ens10.100", info))
    assert isinstance(link, netlink.Link)
    assert (link.kind, link.vlan, link.link, link.ifname) == ("vlan", (0x88A8, 100), 7, "ens10.100")


def test_no_vlan_for_other_kinds_or_without_data() -> None:
    (mv,), _ = netlink.parse(_newlink(9, "mv0", _rta(netlink.IFLA_INFO_KIND, b"macvlan\0")))
    (bare,), _ = netlink.parse(_newlink(9, "v0", _rta(netlink.IFLA_INFO_KIND, b"vlan\0")))
    assert isinstance(mv, netlink.Link) and isinstance(bare, netlink.Link)
    assert (mv.kind, mv.vlan, bare.vlan) == ("macvlan", None, None)


@pytest.mark.parametrize(
    ("mode", "ids", "native"),
    [
        (0, (), False),  # none
        (1, (5,), True),  # native (driver)
        (2, (6,), False),  # generic (skb)
        (3, (7,), False),  # offloaded
        (4, (5, 6), True),  # several, one of them native
        (4, (6, 7), False),  # several: generic and offloaded
    ],
)
def test_native_xdp_from_ifla_xdp(mode: int, ids: tuple[int, ...], native: bool) -> None:
    """IFLA_XDP's attached mode (and, for several, whether one is the driver's) as the
    kernel nests them: the failover device's native XDP is what the agent acts on."""
    xdp = _rta(netlink.IFLA_XDP_ATTACHED, bytes([mode]))
    for attr in ids:  # IFLA_XDP_DRV_PROG_ID 5, _SKB_PROG_ID 6, _HW_PROG_ID 7
        xdp += _rta(attr, struct.pack("=I", 42))
    kind = _rta(netlink.IFLA_INFO_KIND, b"veth\0")
    (link,), _ = netlink.parse(_newlink(9, "ens10", kind, extra=_rta(netlink.IFLA_XDP, xdp)))
    (bare,), _ = netlink.parse(_newlink(9, "ens10", kind))
    assert isinstance(link, netlink.Link) and isinstance(bare, netlink.Link)
    assert (link.xdp_native, bare.xdp_native) == (native, False)


class FakeDumpSocket:
    """A netlink socket that answers each dump request with the next scripted reply."""

    def __init__(self, replies: list[list[bytes]], requests: list[bytes]) -> None:
        self.replies, self.requests = replies, requests
        self.pending: list[bytes] = []

    def __enter__(self) -> FakeDumpSocket:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def bind(self, _addr: Any) -> None:
        pass

    def send(self, data: bytes) -> None:
        self.requests.append(data)
        self.pending = list(self.replies.pop(0))

    def recv(self, _n: int) -> bytes:
        return self.pending.pop(0)


class _SocketModule:
    """The socket module as netlink.py sees it, with netlink sockets from a script."""

    def __init__(self, replies: list[list[bytes]], requests: list[bytes]) -> None:
        self.replies, self.requests = replies, requests

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, *_args: Any) -> FakeDumpSocket:
        return FakeDumpSocket(self.replies, self.requests)


def _script(monkeypatch: pytest.MonkeyPatch, replies: list[list[bytes]]) -> list[bytes]:
    requests: list[bytes] = []
    monkeypatch.setattr(netlink, "socket", _SocketModule(replies, requests))
    return requests


def test_a_dump_marked_interrupted_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    kind = _rta(netlink.IFLA_INFO_KIND, b"veth\0")
    intr = netlink.NLM_F_DUMP_INTR
    replies = [
        # the table changed while it was dumped: the kernel flags a message (here the last)
        [_newlink(9, "stale", kind), _newlink(10, "gone", kind) + _done(intr)],
        [_newlink(9, "fresh", kind) + _done()],
    ]
    requests = _script(monkeypatch, replies)
    links = netlink.dump_links()
    assert [(lk.ifindex, lk.ifname) for lk in links] == [(9, "fresh")]
    assert len(requests) == 2 and not replies


def test_a_dump_interrupted_every_time_fails_after_bounded_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kind = _rta(netlink.IFLA_INFO_KIND, b"veth\0")
    flagged = _newlink(9, "v", kind, netlink.NLM_F_DUMP_INTR) + _done()
    replies = [[flagged]] * (netlink.DUMP_TRIES + 1)
    requests = _script(monkeypatch, replies)
    with pytest.raises(netlink.DumpInterrupted, match="interrupted"):
        netlink.dump_links()
    assert len(requests) == netlink.DUMP_TRIES


def test_what_registration_checks_type_permanent_address_master_mtu_range() -> None:
    """ifi_type, IFLA_PERM_ADDRESS, IFLA_MASTER and the MTU range: what
    failover_slave_register() looks at.  A veth has no permanent address (the kernel omits
    the attribute); a device with no MTU limit says max 0."""
    body = struct.pack("=BxHiII", 0, 776, 9, 0x1, 0)  # ARPHRD_SIT
    body += _rta(netlink.IFLA_IFNAME, b"sit1\0")
    body += _rta(netlink.IFLA_ADDRESS, bytes.fromhex("020000000a01"))
    body += _rta(netlink.IFLA_PERM_ADDRESS, bytes.fromhex("0200000000ff"))
    body += _rta(netlink.IFLA_MASTER, struct.pack("=I", 42))
    body += _rta(netlink.IFLA_MIN_MTU, struct.pack("=I", 68))
    body += _rta(netlink.IFLA_MAX_MTU, struct.pack("=I", 9216))
    msg = struct.pack("=IHHII", 16 + len(body), netlink.RTM_NEWLINK, 0, 0, 0) + body
    (link,), _ = netlink.parse(msg)
    assert isinstance(link, netlink.Link)
    assert (link.arphrd, link.mac, link.perm_mac) == (776, "02:00:00:00:0a:01", "02:00:00:00:00:ff")
    assert (link.master, link.min_mtu, link.max_mtu) == (42, 68, 9216)
    (veth,), _ = netlink.parse(_newlink(9, "v0", _rta(netlink.IFLA_INFO_KIND, b"veth\0")))
    assert isinstance(veth, netlink.Link)
    assert (veth.arphrd, veth.perm_mac, veth.master, veth.max_mtu) == (1, "", 0, 0)
