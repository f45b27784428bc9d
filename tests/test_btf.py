"""The BTF reader behind the per-packet lower check, and bpf(2)'s number by architecture:
pure, no root (a crafted BTF blob; the running kernel's when it has one)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from bpfailover.datapath import bpfsys, btf, layout, layout_gen


class _Blob:
    """A tiny BTF writer: enough kinds to lay out what netdev_layout() looks for."""

    def __init__(self) -> None:
        self.types = b""
        self.strs = b"\0"
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        self.types += struct.pack("<3I", self.s(name), kind << 24 | vlen, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def integer(self, name: str, size: int) -> int:
        return self.add(btf.K_INT, name, 0, size, struct.pack("<I", size * 8))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]], union=False) -> int:
        extra = b"".join(struct.pack("<3I", self.s(n), t, bits) for n, t, bits in members)
        return self.add(btf.K_UNION if union else btf.K_STRUCT, name, len(members), size, extra)

    def enum(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<Ii", self.s(n), v) for n, v in values.items())
        return self.add(btf.K_ENUM, name, len(values), 4, extra)

    def bytes(self) -> bytes:
        hdr = struct.pack(
            "<HBBI4I", btf.BTF_MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strs)
        )
        return hdr + self.types + self.strs


def kernel_like(state_bits: int = 1344, nocarrier: int = 2) -> bytes:
    b = _Blob()
    long_t, int_t = b.integer("long unsigned int", 8), b.integer("int", 4)
    void_p = b.add(btf.K_PTR, "", 0, 0)
    node = b.struct("hlist_node", 16, [("next", void_p, 0), ("pprev", void_p, 64)])
    b.struct("hlist_head", 8, [("first", void_p, 0)])
    b.struct("net", 4288, [("dev_name_head", void_p, 3136), ("dev_index_head", void_p, 3200)])
    inner = b.struct("", 24, [("next", void_p, 0), ("prev", void_p, 64), ("dev", void_p, 128)])
    outer = b.struct("", 24, [("", inner, 0), ("rbnode", node, 0)], union=True)
    b.struct("sk_buff", 232, [("", outer, 0), ("len", int_t, 896)])
    pnet = b.struct("", 8, [("net", void_p, 0)])
    pnet_t = b.add(btf.K_TYPEDEF, "possible_net_t", 0, pnet)
    const_long = b.add(btf.K_CONST, "", 0, long_t)
    b.struct(
        "net_device",
        2496,
        [
            ("state", const_long, state_bits),
            ("ifindex", int_t, 1792),
            ("nd_net", pnet_t, 2112),
            ("index_hlist", node, 8320),
        ],
    )
    b.enum(
        "netdev_state_t",
        {"__LINK_STATE_START": 0, "__LINK_STATE_PRESENT": 1, "__LINK_STATE_NOCARRIER": nocarrier},
    )
    b.struct("xdp_buff", 56, [("data", void_p, 0), ("rxq", void_p, 256)])
    b.struct("xdp_rxq_info", 64, [("dev", void_p, 0)])
    return b.bytes()


def test_layout_from_crafted_btf_through_anonymous_members_and_typedefs() -> None:
    nl = btf.netdev_layout(btf.Btf(kernel_like()))
    assert nl == btf.NetdevLayout(
        skb_dev=16,
        dev_state=168,
        dev_ifindex=224,
        dev_net=264,
        dev_index_hlist=1040,
        net_index_head=400,
        xdp_rxq=32,
        rxq_dev=0,
        bit_start=0,
        bit_nocarrier=2,
    )
    flags = nl.cflags()
    assert flags[0] == "-DFO_DP_CHECK=1"
    assert "-DFO_OFF_DEV_STATE=168" in flags and "-DFO_BIT_LINK_NOCARRIER=2" in flags
    assert all(f.startswith("-DFO_") and f.split("=")[1].isdigit() for f in flags)


def test_layouts_differ_by_kernel_and_are_read_not_assumed() -> None:
    """Another kernel's layout (other offset, other bit) comes out as that kernel's."""
    nl = btf.netdev_layout(btf.Btf(kernel_like(state_bits=1216, nocarrier=3)))
    assert (nl.dev_state, nl.bit_nocarrier) == (152, 3)


@pytest.mark.parametrize(
    ("blob", "error"),
    [
        (b"\0" * 8, "too short"),
        (b"\x12\x34" + b"\0" * 30, "not BTF"),
        (kernel_like(state_bits=1345), "bitfield"),
        (kernel_like().replace(b"__LINK_STATE_NOCARRIER", b"__LINK_STATE_NOCARRIEX"), "NOCARRIER"),
        (kernel_like().replace(b"dev_index_head", b"dev_index_hxxx"), "dev_index_head"),
        (kernel_like().replace(b"xdp_rxq_info", b"xdp_rxq_infx"), "xdp_rxq_info"),
    ],
    ids=["short", "magic", "bitfield", "enum", "member", "struct"],
)
def test_missing_or_odd_layouts_are_one_clear_error(blob: bytes, error: str) -> None:
    with pytest.raises(btf.BtfError, match=error):
        btf.netdev_layout(btf.Btf(blob))


def test_no_btf_file_is_a_btf_error(tmp_path: Path) -> None:
    with pytest.raises(btf.BtfError, match="no kernel BTF"):
        btf.read_netdev_layout(tmp_path / "vmlinux")


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="this kernel has no BTF")
def test_running_kernel_layout_matches_bpftool() -> None:
    nl = btf.read_netdev_layout()
    tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not Path(tool).exists():
        pytest.skip("no bpftool to compare with")
    out = subprocess.run(
        [tool, "btf", "dump", "file", str(btf.VMLINUX), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    in_netdev = False
    found = {}
    for line in out.splitlines():
        if line.startswith("["):
            in_netdev = "STRUCT 'net_device' " in line
        elif in_netdev:
            for member in ("state", "ifindex", "index_hlist"):
                if line.strip().startswith(f"'{member}' "):
                    found[member] = int(line.split("bits_offset=")[1].split()[0]) // 8
    assert found == {
        "state": nl.dev_state,
        "ifindex": nl.dev_ifindex,
        "index_hlist": nl.dev_index_hlist,
    }


@pytest.mark.parametrize(
    ("machine", "number"),
    [("x86_64", 321), ("AMD64", 321), ("aarch64", 280), ("arm64", 280), ("riscv64", 280)],
)
def test_sys_bpf_number_by_architecture(machine: str, number: int) -> None:
    assert bpfsys.sys_bpf_number(machine) == number


def test_sys_bpf_unknown_architecture_is_one_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"bpf\(2\) syscall number unknown for .*'s390x'"):
        bpfsys.sys_bpf_number("s390x")


def test_slot_names_come_from_failover_h() -> None:
    L = layout_gen
    assert layout.SLOT_NAMES == {L.FO_SLOT_STANDBY: "standby", L.FO_SLOT_PRIMARY: "primary"}
    assert layout.ROLE_SLOTS == {"standby": L.FO_SLOT_STANDBY, "primary": L.FO_SLOT_PRIMARY}
    assert L.names("FO_DPC_") == ("off", "on", "refused", "probe_failed", "mismatch")
