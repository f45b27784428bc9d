"""The bpf(2) syscall through ctypes: pins, map elements, object info, BPF_PROG_TEST_RUN.

The agent works on pinned objects only, so it never needs bcc (and LLVM's
~130 MB) after the one-shot loader has compiled and pinned the datapath.
A map write here costs ~2 us, against ~3.3 us through bcc's table API.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

# bpf(2)'s number differs by architecture (asm/unistd.h): the generic table (arm64, riscv,
# loongarch) has 280, x86_64 its own 321.
_SYS_BPF_BY_MACHINE = {
    "x86_64": 321,
    "amd64": 321,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "loongarch64": 280,
}


def sys_bpf_number(machine: str | None = None) -> int:
    """The bpf(2) syscall number on `machine` (default: this one's platform.machine())."""
    machine = machine if machine is not None else platform.machine()
    try:
        return _SYS_BPF_BY_MACHINE[machine.lower()]
    except KeyError:
        known = ", ".join(sorted(_SYS_BPF_BY_MACHINE))
        raise RuntimeError(
            f"bpf(2) syscall number unknown for architecture {machine!r} (known: {known})"
        ) from None


try:
    SYS_BPF: int | None = sys_bpf_number()
    _SYS_BPF_ERROR = ""
except RuntimeError as _e:  # refused at the first bpf(2) call, not at import
    SYS_BPF, _SYS_BPF_ERROR = None, str(_e)

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0
BPF_F_RDONLY = 1 << 3  # file_flags of BPF_OBJ_GET: a map fd that can read, not write
BPF_PROG_TYPE_XDP = 6
BPF_F_XDP_HAS_FRAGS = 1 << 5  # prog_flags: the program takes multi-buffer frames (5.18+)
XDP_PASS = 2

ATTR_SIZE = 128  # large enough for every command used here; the kernel zero-checks the rest

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    pass


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    if SYS_BPF is None:
        raise BpfError(errno.ENOSYS, f"{what}: {_SYS_BPF_ERROR}")
    ret = _libc.syscall(SYS_BPF, cmd, attr, ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _attr(fmt: str, *values: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: str, file_flags: int = 0) -> int:
    """fd of a pinned map or program (file_flags BPF_F_RDONLY: a read-only map fd)."""
    p = ctypes.create_string_buffer(path.encode())
    return _sys_bpf(BPF_OBJ_GET, _attr("=QII", _addr(p), 0, file_flags), f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    _sys_bpf(BPF_OBJ_PIN, _attr("=QII", _addr(p), fd, 0), f"pin {path}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _sys_bpf(BPF_MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), _addr(v), 0), "map lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _sys_bpf(BPF_MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), _addr(v), flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _sys_bpf(BPF_MAP_DELETE_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), 0, 0), "map delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    cur: ctypes.Array[ctypes.c_char] | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        try:
            attr = _attr("=IIQQQ", fd, 0, _addr(cur), _addr(nxt), 0)
            _sys_bpf(BPF_MAP_GET_NEXT_KEY, attr, "map next key")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def prog_load_xdp_pass(name: str) -> int:
    """fd of a new XDP program that passes every frame (`r0 = XDP_PASS; exit`): two
    instructions, so no compiler.  Marked as taking multi-buffer frames where the kernel
    knows the flag, so a veth carrying it keeps its peer's MTU limit where it was."""
    insns = struct.pack("=BBhi", 0xB7, 0, 0, XDP_PASS) + struct.pack("=BBhi", 0x95, 0, 0, 0)
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    last: BpfError | None = None
    for flags in (BPF_F_XDP_HAS_FRAGS, 0):
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
        # prog_flags, prog_name[16]
        attr = _attr("=IIQQIIQII", BPF_PROG_TYPE_XDP, 2, _addr(code), _addr(lic), 0, 0, 0, 0, flags)
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        try:
            return _sys_bpf(BPF_PROG_LOAD, attr, f"load {name}")
        except BpfError as e:
            if e.errno != errno.EINVAL:
                raise
            last = e  # a kernel without the frags flag: load it without
    assert last is not None
    raise last


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str
    name: str


def _info(fd: int, size: int) -> bytes:
    info = ctypes.create_string_buffer(size)
    _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, _addr(info)), "object info")
    return info.raw


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 80)
    mtype, mid, ksz, vsz, maxe, _flags = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mtype, mid, ksz, vsz, maxe, name)


def prog_info(fd: int) -> ProgInfo:
    # struct bpf_prog_info: type, id, tag[8], ... name[16] at offset 64
    raw = _info(fd, 232)
    ptype, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(ptype, pid, tag, name)


@dataclass(frozen=True)
class TestRun:
    retval: int
    data_out: bytes
    duration_ns: int


def prog_test_run(
    fd: int, data: bytes, ctx: bytes | None = None, repeat: int = 1, data_out_size: int = 2048
) -> TestRun:
    """BPF_PROG_TEST_RUN: run a program on a crafted frame (and context)."""
    din = ctypes.create_string_buffer(data, len(data))
    dout = ctypes.create_string_buffer(data_out_size)
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    attr = _attr(
        "=IIIIQQIIIIQQ",
        fd,
        0,
        len(data),
        data_out_size,
        _addr(din),
        _addr(dout),
        repeat,
        0,
        len(ctx) if ctx else 0,
        0,
        _addr(cin),
        0,
    )
    _sys_bpf(BPF_PROG_TEST_RUN, attr, "prog test run")
    _fd, retval, _sin, size_out, _di, _do, _rep, duration = struct.unpack_from("=IIIIQQII", attr, 0)
    return TestRun(retval, dout.raw[:size_out], duration)


def possible_cpus() -> int:
    """Number of possible CPUs: the width of a per-CPU map value."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count
