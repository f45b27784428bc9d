"""Which QEMU accelerator the guests get: KVM only where a stock guest kernel boots under it.

/dev/kvm opening is not enough: a host that is itself a VM may offer a KVM (kvm_pvm, nested
set-ups) under which Debian's kernel hangs early in boot.  So the probe boots the image's
own kernel under KVM with `init=/bin/echo <marker>`: the marker on the serial console within
PROBE_TIMEOUT_S means KVM works; anything else means TCG.  The answer is cached per host boot
(a file under /run named by the kernel's boot id), so only the first run after a reboot pays
for the probe.  BPFAILOVER_PG_ACCEL=kvm|tcg skips the probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.proving_ground.image import Image

ACCELS = ("kvm", "tcg")
PROBE_TIMEOUT_S = 45.0  # a working KVM boots to init in a few seconds
MARKER = "pg-accel-probe-ok"
CACHE_DIR = Path(os.environ.get("BPFAILOVER_PG_ACCEL_CACHE", "/run/bpfailover"))


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def kvm_opens(dev: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def decide(opens: bool, probe: Callable[[], tuple[bool, str]]) -> tuple[str, str]:
    """(accel, why): the probe (booted?, what it saw) runs only when /dev/kvm opens."""
    if not opens:
        return "tcg", "/dev/kvm does not open"
    booted, saw = probe()
    if booted:
        return "kvm", "a stock guest kernel booted under KVM"
    return "tcg", f"/dev/kvm opens but a stock guest kernel does not boot under it: {saw}"


def probe_boot(img: Image, timeout: float = PROBE_TIMEOUT_S, acc: str = "kvm") -> tuple[bool, str]:
    """Boot the image's kernel under KVM to `init=/bin/echo MARKER`: (the marker showed, what
    happened otherwise).  `acc`: another accelerator, to check the probe itself."""
    with tempfile.TemporaryDirectory(prefix="pg-accel-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            "qemu-system-x86_64",
            "-accel",
            acc,
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "512",
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-kernel",
            str(img.kernel),
            "-initrd",
            str(img.initrd),
            # init exits after the echo: the kernel panics, panic=-1 reboots, -no-reboot quits
            "-append",
            f"console=ttyS0 root=/dev/vda ro panic=-1 init=/bin/echo -- {MARKER}",
            "-drive",
            f"file={img.disk},format=raw,if=virtio,snapshot=on",
            "-serial",
            f"file:{console}",
        ]
        qlog = open(Path(tmp) / "qemu.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(argv, stdout=qlog, stderr=subprocess.STDOUT, start_new_session=True)
        qlog.close()
        deadline = time.monotonic() + timeout
        seen = False
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if MARKER in console.read_text(errors="replace").replace(
                        f"init=/bin/echo -- {MARKER}", ""
                    ):
                        seen = True
                        break
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
            if not seen:  # it may have printed the marker just as it quit
                with contextlib.suppress(OSError):
                    text = console.read_text(errors="replace")
                    seen = MARKER in text.replace(f"init=/bin/echo -- {MARKER}", "")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        if seen:
            return True, "booted"
        if time.monotonic() < deadline:
            err = (Path(tmp) / "qemu.log").read_text(errors="replace").strip().splitlines()
            return False, f"QEMU exited ({proc.returncode}): {(err or ['no output'])[-1][:160]}"
        return False, f"no marker from its init within {timeout:.0f}s"


def detect(
    img: Image,
    log: Callable[[str], None] = print,
    probe: Callable[[], tuple[bool, str]] | None = None,
    opens: bool | None = None,
    cache_dir: Path | None = None,
    host_boot: str | None = None,
) -> dict[str, Any]:
    """{"accel", "why", "probe_s", "cached"}: from BPFAILOVER_PG_ACCEL, this host boot's
    cache file, or a probe (recorded in the cache file)."""
    forced = os.environ.get("BPFAILOVER_PG_ACCEL")
    if forced:
        if forced not in ACCELS:
            raise RuntimeError(f"BPFAILOVER_PG_ACCEL={forced!r}: one of {', '.join(ACCELS)}")
        return {"accel": forced, "why": "BPFAILOVER_PG_ACCEL", "probe_s": 0.0, "cached": False}
    cache_dir = cache_dir or CACHE_DIR
    cache = cache_dir / f"accel-{host_boot or boot_id()}.json"
    with contextlib.suppress(OSError, ValueError):
        got = json.loads(cache.read_text())
        if got.get("accel") in ACCELS:
            return {**got, "cached": True}
    t0 = time.monotonic()
    accel, why = decide(kvm_opens() if opens is None else opens, probe or (lambda: probe_boot(img)))
    got = {"accel": accel, "why": why, "probe_s": round(time.monotonic() - t0, 1)}
    log(f"accelerator: {accel} ({why}; probe {got['probe_s']}s, cached in {cache})")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(got))
    tmp.replace(cache)
    return {**got, "cached": False}
