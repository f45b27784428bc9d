"""One-shot loader: compile the datapath with bcc, load it, pin maps and programs.

Run as its own short-lived process (`python -m bpfailover.loader PIN_DIR`), so
the long-running agent never holds LLVM.  Everything is pinned into a scratch
directory first and renamed into place at the end: a pin directory either
holds a whole datapath or does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from bpfailover.datapath import bpfsys, btf, kheaders, layout
from bpfailover.datapath.layout_gen import (
    FO_ABI_VERSION,
    FO_DPC_OFF,
    FO_DPC_ON,
    FO_DPC_PROBE_FAILED,
    FO_DPC_REFUSED,
    FO_META_ABI,
    FO_META_DP_CHECK,
    names,
)

PROGS = {  # pin name -> (function, bcc program type attribute)
    "prog_fo_egress": ("fo_egress", "SCHED_CLS"),
    "prog_lower_ingress": ("lower_ingress", "SCHED_CLS"),
    "prog_xdp_lower_rx": ("xdp_lower_rx", "XDP"),
    "prog_peer_pass": ("fo_peer_pass", "XDP"),
}
# XDP_PASS on the hidden peer while the failover device has a native XDP program
# (attach.Wiring.peer_pass); built with bpf(2), not compiled (bpfsys.prog_load_xdp_pass).
PEER_PASS = "prog_peer_pass"
MAPS = (
    "fo_meta",
    "fo_dev",
    "fo_group",
    "fo_active",
    "fo_lower",
    "fo_stats",
    "fo_drops",
    "fo_fallback",
    "fo_xdp_up",
    "fo_events",
)
TEST_MAPS = ("fo_last_redirect",)
BPF_FS_MAGIC = 0xCAFE4A11
# load-time checks of the BTF offsets (never pinned or attached)
PROBE_PROG, PROBE_PROG_XDP = "fo_dp_probe", "fo_dp_probe_xdp"


class LoadError(RuntimeError):
    pass


def fs_magic(path: Path) -> int:
    """statfs(2)'s f_type of the filesystem `path` is on (OSError if it cannot say)."""
    import ctypes

    buf = ctypes.create_string_buffer(128)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return int.from_bytes(buf.raw[:8], "little")


def check_bpffs(path: Path) -> None:
    """The pin directory must be on a mounted bpffs: its parent, and itself if it is there
    (a directory: anything else is refused by the owner check)."""
    parent = path.parent
    if not parent.is_dir():
        raise LoadError(
            f"{parent} does not exist: mount bpffs (mount -t bpf -o mode=700 bpf /sys/fs/bpf)"
        )
    for p in (parent, path):
        if p is path and not stat.S_ISDIR(_lstat_mode(path)):
            continue
        try:
            magic = fs_magic(p)
        except OSError as e:
            raise LoadError(f"statfs {p}: {e.strerror}") from None
        if magic == BPF_FS_MAGIC:
            continue
        if p == Path("/sys/fs/bpf"):  # the usual mount point, not mounted
            raise LoadError(f"{p} is not a bpffs mount: run mount -t bpf -o mode=700 bpf {p}")
        raise LoadError(
            f"{path}: {p} is not a bpffs mount: bpffs must name a directory on a bpf "
            "filesystem (e.g. /sys/fs/bpf/bpfailover)"
        )


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _source() -> str:
    # One compilation unit, so both hooks share one set of maps.  bcc rewrites
    # map calls (m.lookup()) only in its main file, so the headers with map calls go
    # into the text too (their include guards make the programs' own #include a no-op).
    d = layout.bpf_dir()
    prologue = (
        "#include <uapi/linux/bpf.h>\n#include <uapi/linux/pkt_cls.h>\n#define FO_BPF_PROG 1\n"
    )
    # (No #line markers: they confuse bcc's rewriter as well.)
    return prologue + "".join(
        f"/* {name} */\n{(d / name).read_text()}\n"
        for name in ("fo_kern.h", "fo_rules.h", "failover_tc.c", "failover_xdp.c")
    )


PROBE_IFINDEX = 7919  # the probe's veth in a private netns: an ifindex nothing else has


def run_probe(prog_fd: int, xdp_prog_fd: int) -> str:
    """Run the probes on a veth down, up without carrier, and up with carrier: '' when every
    reading is right, else what was wrong.  The veth lives in a private netns entered by a
    thread of its own (gone with the thread); without CAP_SYS_ADMIN (failoverd's systemd
    unit) in this netns instead, under a name of its own, deleted at once."""
    import ctypes
    import threading

    result: list[str] = []

    def probe() -> None:
        from pyroute2 import IPRoute

        libc = ctypes.CDLL(None, use_errno=True)
        private = libc.unshare(0x40000000) == 0  # CLONE_NEWNET
        tag = "" if private else str(os.getpid() % 100000)
        names = (f"fo-probe{tag}a", f"fo-probe{tag}b")
        with IPRoute() as ipr:
            extra = {"index": PROBE_IFINDEX} if private else {}
            ipr.link("add", ifname=names[0], kind="veth", peer=names[1], **extra)
            try:
                result.append(_probe_steps(ipr, names, prog_fd, xdp_prog_fd))
            finally:
                if not private:
                    ipr.link("del", ifname=names[0])

    t = threading.Thread(target=probe, name="fo-dp-probe")
    t.start()
    t.join()
    return result[0] if result else "the probe did not run"


def _probe_steps(ipr: Any, names: tuple[str, str], prog_fd: int, xdp_prog_fd: int) -> str:
    ifindex = ipr.link_lookup(ifname=names[0])[0]
    steps = (
        ("down", None, 0b1011),
        ("up, no carrier", names[0], 0b1111),
        ("up with carrier", names[1], 0b0111),
    )
    for what, bring_up, want in steps:
        if bring_up:
            ipr.link("set", index=ipr.link_lookup(ifname=bring_up)[0], state="up")
        ctx = bytearray(192)  # struct __sk_buff: ifindex at offset 40
        ctx[40:44] = ifindex.to_bytes(4, sys.byteorder)
        got = bpfsys.prog_test_run(prog_fd, bytes(64), bytes(ctx)).retval
        if got != want:
            return f"probe on a veth {what}: read {got:#06b}, expected {want:#06b}"
    xctx = bytearray(24)  # struct xdp_md: data_end at 4, ingress_ifindex at 12
    xctx[4:8] = (64).to_bytes(4, sys.byteorder)
    xctx[12:16] = ifindex.to_bytes(4, sys.byteorder)
    if bpfsys.prog_test_run(xdp_prog_fd, bytes(64), bytes(xctx)).retval != 1:
        return "XDP probe: the ifindex read through xdp_buff->rxq->dev is wrong"
    return ""


def compile_and_pin(
    pin_dir: Path,
    test_hooks: bool = False,
    dp_check: bool = True,
    btf_path: Path = btf.VMLINUX,
    layout_override: dict[str, int] | None = None,
) -> dict[str, object]:
    """Compile, load and pin.  The per-packet lower check is compiled in when the running
    kernel's BTF gives its layouts; a refused program or a failed probe leaves it off
    (fo_meta says why) and the datapath loads all the same.  `layout_override` (tests only)
    replaces BTF offsets, to show that wrong ones are caught."""
    check_bpffs(pin_dir)
    headers = kheaders.find()
    os.environ.update(headers.env)
    from bcc import BPF  # imported late: the env must be set first

    text = _source().encode()
    base = [f"-I{layout.bpf_dir()}", "-Wno-unused-function"]
    if test_hooks:
        base.append("-DFO_TEST_HOOKS=1")
    dpc, dpc_note = FO_DPC_OFF, "disabled in the configuration"
    nl: btf.NetdevLayout | None = None
    if dp_check:
        try:
            nl = btf.read_netdev_layout(btf_path)
            if layout_override:
                nl = btf.NetdevLayout(**{**nl.__dict__, **layout_override})
        except btf.BtfError as e:
            dpc_note = f"no kernel layouts from BTF: {e}"

    def build(with_check: bool) -> tuple[Any, dict[str, Any]]:
        cflags = base + (nl.cflags() if with_check and nl is not None else [])
        try:
            b = BPF(text=text, cflags=cflags)
        except Exception as e:
            raise LoadError(
                f"compiling {layout.bpf_dir()} failed ({headers.description}): {e}"
            ) from e
        fns = {
            pin: b.load_func(func.encode(), getattr(BPF, ptype))
            for pin, (func, ptype) in PROGS.items()
            if pin != PEER_PASS
        }
        return b, fns

    t0 = time.monotonic()
    b = fns = None
    if nl is not None:
        try:
            b, fns = build(True)
            dpc, dpc_note = FO_DPC_ON, "on"
        except Exception as e:  # the verifier (or the compiler) refused the checking code
            last = [ln for ln in str(e).splitlines() if ln.strip()]
            dpc, dpc_note = FO_DPC_REFUSED, f"refused: {last[-1] if last else e}"
            b = fns = None
    if b is None or fns is None:
        b, fns = build(False)
    compile_s = time.monotonic() - t0
    if dpc == FO_DPC_ON:
        probe = b.load_func(PROBE_PROG.encode(), BPF.SCHED_CLS)
        try:
            xprobe = b.load_func(PROBE_PROG_XDP.encode(), BPF.XDP)
            wrong = run_probe(probe.fd, xprobe.fd)
        except Exception as e:  # noqa: BLE001 - any failure to probe leaves the check off
            wrong = f"could not run: {e}"
        if wrong:
            dpc, dpc_note = FO_DPC_PROBE_FAILED, f"load-time probe: {wrong}"
    meta = b[b"fo_meta"]
    meta[meta.Key(FO_META_ABI)] = meta.Leaf(FO_ABI_VERSION)
    meta[meta.Key(FO_META_DP_CHECK)] = meta.Leaf(dpc)

    # bpffs refuses names with a dot in them.
    tmp = pin_dir.parent / f"{pin_dir.name}-loading-{os.getpid()}"
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)  # whatever the umask: only root may look in or add pins
    try:
        from bcc.libbcc import lib

        def pin(fd: int, name: str) -> None:
            if lib.bpf_obj_pin(fd, str(tmp / name).encode()) != 0:
                raise LoadError(f"pinning {name} under {tmp} failed")

        for name in MAPS + (TEST_MAPS if test_hooks else ()):
            pin(b[name.encode()].map_fd, name)
        for pin_name, fn in fns.items():
            pin(fn.fd, pin_name)
        pass_fd = bpfsys.prog_load_xdp_pass(PROGS[PEER_PASS][0])
        try:
            pin(pass_fd, PEER_PASS)
        finally:
            os.close(pass_fd)
        try:
            os.rename(tmp, pin_dir)
        except OSError as e:
            raise LoadError(f"{pin_dir} appeared meanwhile (another loader?): {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info: dict[str, object] = {
        "pin_dir": str(pin_dir),
        "headers": headers.description,
        "compile_s": compile_s,
        "datapath_check": names("FO_DPC_")[dpc],
    }
    if dpc != FO_DPC_ON:  # why it is off; "on" says all there is
        info["datapath_check_note"] = dpc_note
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bpfailover-loader")
    ap.add_argument("pin_dir", type=Path)
    ap.add_argument("--test-hooks", action="store_true")
    ap.add_argument(
        "--no-datapath-check", action="store_true", help="leave the per-packet lower check out"
    )
    ap.add_argument(
        "--layout-override",
        type=json.loads,
        default=None,
        help="tests only: JSON of NetdevLayout fields replacing the BTF values",
    )
    ap.add_argument(
        "--btf",
        type=Path,
        default=btf.VMLINUX,
        help=f"kernel BTF to read the layouts from (default {btf.VMLINUX})",
    )
    args = ap.parse_args(argv)
    try:
        result = compile_and_pin(
            args.pin_dir,
            args.test_hooks,
            dp_check=not args.no_datapath_check,
            btf_path=args.btf,
            layout_override=args.layout_override,
        )
    except (LoadError, kheaders.HeadersError) as e:
        print(f"bpfailover-loader: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
