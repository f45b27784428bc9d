"""`python -m bench.proving_ground.guest_tests --kernel 6.12`: the root/netns/BPF test layers
run inside a proving-ground guest, on Debian 12's kernel of that version.

The guest is the proving ground's image (image.py) booted without its NICs: the live
repository mounted read-only over the image's copy (9p), pytest from the image's venv with
its cache off and its temporary files on the guest's /tmp (a tmpfs).  Prints pytest's own
output as it comes, then one line `guest-tests <release>: N passed, M failed, K skipped`;
exits non-zero on any failure (or if pytest did not finish).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from bench.proving_ground import accel, image
from bench.proving_ground.vm import BOOT_TIMEOUT_S, QMP, Guest, VMError

# The test files whose tests need root, netns and BPF: the layers a kernel difference can
# break.  The rest of the suite is kernel-independent Python (it runs on the host in CI).
TESTS = (
    "tests/test_bpf_progs.py",
    "tests/test_btf.py",
    "tests/test_lab_datapath.py",
    "tests/test_datapath_check_lab.py",
    "tests/test_agent_lab.py",
    "tests/test_senders_lab.py",
)
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def counts(text: str) -> dict[str, int]:
    """pytest's final summary line (`3 passed, 1 skipped in 2.1s`) as counts."""
    got: dict[str, int] = {}
    for line in reversed(text.splitlines()):
        if re.search(r" in [\d.]+s", line) and SUMMARY.search(line):
            for n, what in SUMMARY.findall(line):
                got["error" if what.startswith("error") else what] = int(n)
            break
    return got


def final_line(release: str, c: dict[str, int]) -> str:
    line = (
        f"guest-tests {release}: {c.get('passed', 0)} passed, "
        f"{c.get('failed', 0) + c.get('error', 0)} failed, {c.get('skipped', 0)} skipped"
    )
    extra = [f"{c[k]} {k}" for k in ("xfailed", "xpassed") if c.get(k)]
    return line + (f" ({', '.join(extra)})" if extra else "")


def qemu_argv(img: image.Image, workdir: Path, acc: str, mem_mb: int, smp: int) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel",
        acc,
        "-machine",
        "q35",
        "-cpu",
        "max",
        "-smp",
        str(smp),
        "-m",
        str(mem_mb),
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-kernel",
        str(img.kernel),
        "-initrd",
        str(img.initrd),
        "-append",
        "console=ttyS0 root=/dev/vda rw init=/sbin/pg-init panic=-1 net.ifnames=0 quiet loglevel=4",
        "-drive",
        f"file={img.disk},format=raw,if=virtio,snapshot=on",
        "-serial",
        f"file:{workdir / 'console.log'}",
        "-qmp",
        f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        f"socket,id=pgch,path={workdir / 'guest.sock'},server=on,wait=off",
        "-device",
        "virtserialport,chardev=pgch,name=pg",
        "-virtfs",
        f"local,path={image.REPO},mount_tag=repo,security_model=none,readonly=on",
    ]


def pytest_cmd(tests: list[str], kexpr: str | None) -> str:
    argv = [
        f"{image.GUEST_VENV}/bin/python3",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",  # the repository is read-only in the guest
        "-q",
        "-rfEs",
        "--color=no",
        *tests,
    ]
    if kexpr:
        argv += ["-k", kexpr]
    # What the guest's minimal init leaves out and the tests use: /dev/net/tun (made when
    # the module loads) and configfs (netconsole's targets).
    prep = "modprobe tun; mount -t configfs configfs /sys/kernel/config; "
    # CI=true: a root test that cannot run fails instead of skipping (tests/conftest.py)
    # the package's bpfailover (built from this tree: the image's key follows its sources),
    # the repository's tests, lab and bench
    env = f"PYTHONPATH={image.GUEST_PYTHONPATH} TMPDIR=/tmp CI=true"
    return f"{prep}cd {image.GUEST_REPO} && {env} exec {shlex.join(argv)} 2>&1"


def run_in_guest(
    img: image.Image,
    acc: str,
    tests: list[str],
    kexpr: str | None,
    mem_mb: int,
    smp: int,
    timeout: float,
) -> tuple[int | None, str, float, float]:
    """(pytest's exit code or None, its output, boot s, test s)."""
    workdir = Path(tempfile.mkdtemp(prefix="bpfailover-guest-tests-"))
    t0 = time.monotonic()
    log = open(workdir / "qemu.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        qemu_argv(img, workdir, acc, mem_mb, smp),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    qmp: QMP | None = None
    guest: Guest | None = None
    out: list[str] = []
    try:
        qmp = QMP(workdir / "qmp.sock")
        guest = Guest(workdir / "guest.sock")
        try:
            guest.wait_ready(BOOT_TIMEOUT_S)
        except VMError as e:
            tail = (workdir / "console.log").read_text(errors="replace").splitlines()[-6:]
            raise VMError(f"{e}; console: {' | '.join(tail)}") from e
        boot_s = time.monotonic() - t0
        print(f"guest-tests: booted {guest.hello.get('kernel')} in {boot_s:.0f}s", flush=True)
        t1 = time.monotonic()
        h = guest.req("spawn", argv=["sh", "-c", pytest_cmd(tests, kexpr)])["h"]
        deadline = t1 + timeout
        rc: int | None = None
        while time.monotonic() < deadline:
            r = guest.req("readline", timeout=60, h=h)
            if r.get("line") is not None:
                out.append(r["line"])
                print(r["line"], flush=True)
            elif r.get("eof"):
                w = guest.req("wait", timeout=60, h=h)
                rc = w.get("rc")
                for line in str(w.get("out", "")).splitlines():
                    out.append(line)
                    print(line, flush=True)
                break
        else:
            print(f"guest-tests: pytest did not finish within {timeout:.0f}s", flush=True)
            guest.req("kill", h=h)
        return rc, "\n".join(out), boot_s, time.monotonic() - t1
    finally:
        if guest is not None:
            guest.close()
        if qmp is not None:
            with contextlib.suppress(VMError):
                qmp.cmd("quit", timeout=5)
            qmp.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _on_term(*_: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.proving_ground.guest_tests", description=__doc__
    )
    ap.add_argument(
        "--kernel", choices=tuple(image.KERNELS), help="default: BPFAILOVER_PG_KERNEL, else 6.1"
    )
    ap.add_argument(
        "--tests",
        nargs="+",
        default=list(TESTS),
        help="test files (default: the root/netns/BPF layers)",
    )
    ap.add_argument("-k", dest="kexpr", help="pytest -k expression")
    ap.add_argument("--mem", type=int, default=2048, help="guest memory, MiB")
    ap.add_argument(
        "--smp",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="guest vCPUs (default: up to 2, as the host has)",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for pytest in the guest")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("guest-tests: needs root (QEMU with the image, debootstrap)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_term)
    t0 = time.monotonic()
    try:
        kernel = image.kernel_choice(args.kernel)
        img, _ = image.ensure_image(kernel=kernel)
        acc = accel.detect(img)
        print(
            f"guest-tests: kernel {img.meta.get('kernel')}, "
            f"accelerator {acc['accel']} ({acc['why']}), -m {args.mem} -smp {args.smp}",
            flush=True,
        )
        rc, out, boot_s, test_s = run_in_guest(
            img, acc["accel"], args.tests, args.kexpr, args.mem, args.smp, args.timeout
        )
    except KeyboardInterrupt:
        print("guest-tests: interrupted (cleaned up)", file=sys.stderr)
        return 130
    except (image.ImageError, RuntimeError) as e:
        print(f"guest-tests: {e}", file=sys.stderr)
        return 1
    c = counts(out)
    print(
        f"guest-tests: boot {boot_s:.0f}s, pytest {test_s:.0f}s, "
        f"total {time.monotonic() - t0:.0f}s ({acc['accel'].upper()})",
        flush=True,
    )
    print(final_line(str(img.meta.get("kernel")), c), flush=True)
    return 0 if rc == 0 and not c.get("failed") and not c.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
