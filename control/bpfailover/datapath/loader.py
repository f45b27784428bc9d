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
import sys
import time
from pathlib import Path

from bpfailover.datapath import kheaders, layout

PROGS = {  # pin name -> (function, bcc program type attribute)
    "prog_fo_egress": ("fo_egress", "SCHED_CLS"),
    "prog_lower_ingress": ("lower_ingress", "SCHED_CLS"),
    "prog_xdp_lower_rx": ("xdp_lower_rx", "XDP"),
}
MAPS = (
    "fo_meta",
    "fo_dev",
    "fo_group",
    "fo_active",
    "fo_lower",
    "fo_stats",
    "fo_drops",
    "fo_xdp_up",
)
TEST_MAPS = ("fo_last_redirect",)
BPF_FS_MAGIC = 0xCAFE4A11


class LoadError(RuntimeError):
    pass


def check_bpffs(path: Path) -> None:
    """The pin directory's parent must be on a mounted bpffs."""
    import ctypes

    parent = path.parent
    if not parent.is_dir():
        raise LoadError(
            f"{parent} does not exist: mount bpffs (mount -t bpf -o mode=700 bpf /sys/fs/bpf)"
        )
    buf = ctypes.create_string_buffer(128)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(parent).encode(), buf) != 0:
        raise LoadError(f"statfs {parent}: {os.strerror(ctypes.get_errno())}")
    magic = int.from_bytes(buf.raw[:8], "little")
    if magic != BPF_FS_MAGIC:
        raise LoadError(f"{parent} is not a bpffs mount: run mount -t bpf -o mode=700 bpf {parent}")


def compile_and_pin(pin_dir: Path, test_hooks: bool = False) -> dict[str, object]:
    check_bpffs(pin_dir)
    headers = kheaders.find()
    os.environ.update(headers.env)
    from bcc import BPF  # imported late: the env must be set first

    # One compilation unit, so both hooks share one set of maps.  bcc rewrites
    # map calls (m.lookup()) only in its main file, so fo_lib.h goes into the
    # text too (its include guard makes the programs' own #include a no-op).
    d = layout.bpf_dir()
    prologue = (
        "#include <uapi/linux/bpf.h>\n#include <uapi/linux/pkt_cls.h>\n#define FO_BPF_PROG 1\n"
    )
    # (No #line markers: they confuse bcc's rewriter as well.)
    text = prologue + "".join(
        f"/* {name} */\n{(d / name).read_text()}\n"
        for name in ("fo_lib.h", "failover_tc.c", "failover_xdp.c")
    )
    cflags = [f"-I{layout.bpf_dir()}", "-Wno-unused-function"]
    if test_hooks:
        cflags.append("-DFO_TEST_HOOKS=1")
    t0 = time.monotonic()
    try:
        b = BPF(text=text.encode(), cflags=cflags)
    except Exception as e:
        raise LoadError(f"compiling {layout.bpf_dir()} failed ({headers.description}): {e}") from e
    compile_s = time.monotonic() - t0
    L = layout.load()
    b[b"fo_meta"][b[b"fo_meta"].Key(0)] = b[b"fo_meta"].Leaf(L.FO_ABI_VERSION)

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
        for pin_name, (func, ptype) in PROGS.items():
            fn = b.load_func(func.encode(), getattr(BPF, ptype))
            pin(fn.fd, pin_name)
        try:
            os.rename(tmp, pin_dir)
        except OSError as e:
            raise LoadError(f"{pin_dir} appeared meanwhile (another loader?): {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"pin_dir": str(pin_dir), "headers": headers.description, "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bpfailover-loader")
    ap.add_argument("pin_dir", type=Path)
    ap.add_argument("--test-hooks", action="store_true")
    args = ap.parse_args(argv)
    try:
        result = compile_and_pin(args.pin_dir, args.test_hooks)
    except (LoadError, kheaders.HeadersError) as e:
        print(f"bpfailover-loader: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
