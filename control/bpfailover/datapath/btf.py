"""The few kernel layouts the datapath's per-packet lower check reads, from the running
kernel's BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever headers it finds (Debian's 6.1 ones on a 6.18 kernel), so
struct offsets taken from them would be wrong; BTF describes the kernel that is running.
Only the type section is parsed (header, types, strings: Documentation/bpf/btf.rst), enough
to find struct members (through anonymous structs/unions and typedefs) and enum values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h) and the bytes that follow each btf_type.
K_INT, K_PTR, K_ARRAY, K_STRUCT, K_UNION, K_ENUM = 1, 2, 3, 4, 5, 6
K_TYPEDEF, K_VOLATILE, K_CONST, K_RESTRICT, K_TYPE_TAG, K_ENUM64 = 8, 9, 10, 11, 18, 19
_FIXED_EXTRA = {K_INT: 4, K_ARRAY: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
_PER_MEMBER = {K_STRUCT: 12, K_UNION: 12, K_ENUM: 8, 13: 8, 15: 12, K_ENUM64: 12}
_MODIFIERS = (K_TYPEDEF, K_VOLATILE, K_CONST, K_RESTRICT, K_TYPE_TAG)

# NETDEV_HASHBITS (include/linux/netdevice.h): the buckets of net->dev_index_head. A kernel
# constant since 2.6 that BTF does not carry; a wrong value only makes lookups miss (the
# load-time probe then refuses the check).
NETDEV_HASHBITS = 8


class BtfError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    kind_flag: bool
    members: tuple[tuple[str, int, int], ...]  # (name, type id, bit offset) / enum (name, value)


class Btf:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        endian = "<"
        if magic != BTF_MAGIC:
            magic, _version, _flags, hdr_len = struct.unpack_from(">HBBI", data, 0)
            endian = ">"
            if magic != BTF_MAGIC:
                raise BtfError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from(endian + "4I", data, 8)
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        strs = data[hdr_len + str_off : hdr_len + str_off + str_len]
        if len(types) != type_len or len(strs) != str_len:
            raise BtfError("BTF sections run past the end of the blob")

        def name(off: int) -> str:
            end = strs.find(b"\0", off)
            return strs[off : end if end >= 0 else len(strs)].decode(errors="replace")

        self.types: list[_Type | None] = [None]  # type id 0 is void
        self.by_name: dict[tuple[int, str], list[int]] = {}
        pos = 0
        while pos < len(types):
            name_off, info, size_or_type = struct.unpack_from(endian + "3I", types, pos)
            pos += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            members: list[tuple[str, int, int]] = []
            if kind in (K_STRUCT, K_UNION):
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from(endian + "3I", types, pos)
                    pos += 12
                    bit_off = m_off & 0xFFFFFF if kflag else m_off
                    members.append((name(m_name), m_type, bit_off))
            elif kind == K_ENUM:
                for _ in range(vlen):
                    m_name, val = struct.unpack_from(endian + "Ii", types, pos)
                    pos += 8
                    members.append((name(m_name), 0, val))
            elif kind == K_ENUM64:
                for _ in range(vlen):
                    m_name, lo, hi = struct.unpack_from(endian + "3I", types, pos)
                    pos += 12
                    members.append((name(m_name), 0, lo | hi << 32))
            elif kind in _PER_MEMBER:
                pos += _PER_MEMBER[kind] * vlen
            else:
                pos += _FIXED_EXTRA.get(kind, 0)
            t = _Type(kind, name(name_off), size_or_type, kflag, tuple(members))
            self.by_name.setdefault((kind, t.name), []).append(len(self.types))
            self.types.append(t)

    @classmethod
    def load(cls, path: Path = VMLINUX) -> Btf:
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise BtfError(f"no kernel BTF at {path}: {e.strerror}") from e

    def _type(self, tid: int) -> _Type:
        t = self.types[tid] if 0 < tid < len(self.types) else None
        if t is None:
            raise BtfError(f"BTF type id {tid} out of range")
        return t

    def resolve(self, tid: int) -> int:
        """Through typedefs and qualifiers to the type they name."""
        for _ in range(32):
            t = self._type(tid)
            if t.kind not in _MODIFIERS:
                return tid
            tid = t.size_or_type
        raise BtfError("BTF typedef chain too long")

    def struct_id(self, name: str) -> int:
        for tid in self.by_name.get((K_STRUCT, name), []):
            if self._type(tid).members:  # a complete definition, not a forward one
                return tid
        raise BtfError(f"struct {name} not in BTF")

    def _member(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of `name` in struct/union tid, looking into anonymous ones."""
        for m_name, m_type, bit_off in self._type(tid).members:
            if m_name == name:
                return bit_off, m_type
            if not m_name:
                inner = self.resolve(m_type)
                if self._type(inner).kind in (K_STRUCT, K_UNION):
                    found = self._member(inner, name)
                    if found is not None:
                        return bit_off + found[0], found[1]
        return None

    def member(self, struct_name: str, path: str) -> tuple[int, _Type]:
        """Byte offset of `path` ("nd_net.net" goes into nested members) in a struct, and
        the member's resolved type."""
        tid = self.struct_id(struct_name)
        bits = 0
        for part in path.split("."):
            kind = self._type(tid).kind
            if kind not in (K_STRUCT, K_UNION):
                raise BtfError(f"struct {struct_name}: {path}: {part!r} is not inside a struct")
            found = self._member(tid, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            bits += found[0]
            tid = self.resolve(found[1])
        if bits % 8:
            raise BtfError(f"struct {struct_name}.{path} is a bitfield")
        return bits // 8, self._type(tid)

    def enum_value(self, name: str) -> int:
        for t in self.types:
            if t is not None and t.kind in (K_ENUM, K_ENUM64):
                for m_name, _, val in t.members:
                    if m_name == name:
                        return val
        raise BtfError(f"enum value {name} not in BTF")


@dataclass(frozen=True)
class NetdevLayout:
    """What the per-packet lower check reads, as -D cflags for the BPF compile."""

    skb_dev: int  # sk_buff.dev
    dev_state: int  # net_device.state (unsigned long)
    dev_ifindex: int  # net_device.ifindex (int)
    dev_net: int  # net_device.nd_net.net
    dev_index_hlist: int  # net_device.index_hlist (hlist_node: next first)
    net_index_head: int  # net.dev_index_head (struct hlist_head *)
    xdp_rxq: int  # xdp_buff.rxq (XDP's context is an xdp_buff)
    rxq_dev: int  # xdp_rxq_info.dev
    bit_start: int  # __LINK_STATE_START
    bit_nocarrier: int  # __LINK_STATE_NOCARRIER
    hash_bits: int = NETDEV_HASHBITS
    # Two fields at most this many bytes apart are fetched with one probe read (tests set 0
    # to compile the one-read-per-field code as well).
    read_window: int = 128

    def cflags(self) -> list[str]:
        names = {
            "FO_OFF_SKB_DEV": self.skb_dev,
            "FO_OFF_DEV_STATE": self.dev_state,
            "FO_OFF_DEV_IFINDEX": self.dev_ifindex,
            "FO_OFF_DEV_NET": self.dev_net,
            "FO_OFF_DEV_INDEX_HLIST": self.dev_index_hlist,
            "FO_OFF_NET_INDEX_HEAD": self.net_index_head,
            "FO_OFF_XDP_RXQ": self.xdp_rxq,
            "FO_OFF_RXQ_DEV": self.rxq_dev,
            "FO_BIT_LINK_START": self.bit_start,
            "FO_BIT_LINK_NOCARRIER": self.bit_nocarrier,
            "FO_NETDEV_HASHBITS": self.hash_bits,
            "FO_WIN_MAX": self.read_window,
        }
        return ["-DFO_DP_CHECK=1"] + [f"-D{k}={int(v)}" for k, v in names.items()]


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise BtfError(what)


def netdev_layout(btf: Btf) -> NetdevLayout:
    """The offsets and bits, each checked for the type and size the BPF code assumes."""

    def ptr(struct_name: str, path: str) -> int:
        off, t = btf.member(struct_name, path)
        _check(t.kind == K_PTR, f"struct {struct_name}.{path} is not a pointer")
        return off

    def integer(struct_name: str, path: str, size: int) -> int:
        off, t = btf.member(struct_name, path)
        _check(
            t.kind in (K_INT, K_ENUM) and t.size_or_type == size,
            f"struct {struct_name}.{path} is not a {size}-byte integer",
        )
        return off

    hlist_off, hlist_t = btf.member("net_device", "index_hlist")
    _check(
        hlist_t.kind == K_STRUCT and hlist_t.name == "hlist_node",
        "struct net_device.index_hlist is not an hlist_node",
    )
    _check(btf.member("hlist_node", "next")[0] == 0, "hlist_node.next is not its first member")
    _check(btf.member("hlist_head", "first")[0] == 0, "hlist_head.first is not its first member")
    layout = NetdevLayout(
        skb_dev=ptr("sk_buff", "dev"),
        dev_state=integer("net_device", "state", 8),
        dev_ifindex=integer("net_device", "ifindex", 4),
        dev_net=ptr("net_device", "nd_net.net"),
        dev_index_hlist=hlist_off,
        net_index_head=ptr("net", "dev_index_head"),
        xdp_rxq=ptr("xdp_buff", "rxq"),
        rxq_dev=ptr("xdp_rxq_info", "dev"),
        bit_start=btf.enum_value("__LINK_STATE_START"),
        bit_nocarrier=btf.enum_value("__LINK_STATE_NOCARRIER"),
    )
    for name, value in layout.__dict__.items():
        if name not in ("bit_start", "bit_nocarrier", "hash_bits", "read_window"):
            _check(0 <= value < 65536, f"{name} offset out of range")
    _check(0 <= layout.bit_start < 64 and 0 <= layout.bit_nocarrier < 64, "state bits >= 64")
    return layout


def read_netdev_layout(path: Path = VMLINUX) -> NetdevLayout:
    return netdev_layout(Btf.load(path))
