"""The lean rtnetlink parser reads what the agent keys on, from the kernel's wire format."""

from __future__ import annotations

import struct

from bpfailover.events import netlink


def _rta(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((-n) % 4)


def _newlink(ifindex: int, name: str, linkinfo: bytes) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, ifindex, 0x1, 0)
    body += _rta(netlink.IFLA_IFNAME, name.encode() + b"\0")
    body += _rta(netlink.IFLA_LINK, struct.pack("=i", 7))
    body += _rta(netlink.IFLA_LINKINFO, linkinfo)
    return struct.pack("=IHHII", 16 + len(body), netlink.RTM_NEWLINK, 0, 0, 0) + body


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
