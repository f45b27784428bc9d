"""The VF as the host sees it: attached?, detach (and wait until it is gone), attach.

* `QmpVf`: plain QEMU.  `device_del ID` and the DEVICE_DELETED event (the guest has
  released it: ACPI/PCIe hot-unplug done), `device_add DRIVER,prop=value,...`.
* `VirshVf`: libvirt.  `virsh detach-device DOMAIN FILE --live`, then the domain XML is
  read until the hostdev's PCI address is gone; `virsh attach-device` on the destination.
"""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from typing import Any

from bpfailover.host.qmp import QMP, QMPError


class VfError(RuntimeError):
    pass


def parse_device(spec: str) -> dict[str, Any]:
    """`e1000e,netdev=hpri,mac=...,id=pri0` (as for -device) -> device_add arguments."""
    parts = [p for p in spec.split(",") if p]
    if not parts or "=" in parts[0]:
        raise ValueError(f"--device {spec!r}: start with the driver name (DRIVER,prop=value,...)")
    args: dict[str, Any] = {"driver": parts[0]}
    for p in parts[1:]:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise ValueError(f"--device {spec!r}: {p!r} is not prop=value")
        args[k] = v
    if "id" not in args:
        raise ValueError(f"--device {spec!r}: needs id=... (device_del finds the VF by it)")
    return args


class Vf:
    name = "VF"

    def attached(self) -> bool:
        raise NotImplementedError

    def detach(self, timeout: float) -> None:
        raise NotImplementedError

    def attach(self, on_destination: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class QmpVf(Vf):
    def __init__(self, qmp_path: str, device: dict[str, Any], timeout: float = 10.0) -> None:
        self.path, self.device, self.timeout = qmp_path, device, timeout
        self.id = str(device["id"])
        self.name = f"VF {self.id}"
        self._qmp: QMP | None = None

    @property
    def qmp(self) -> QMP:
        if self._qmp is None:
            try:
                self._qmp = QMP(self.path, self.timeout)
            except QMPError as e:
                raise VfError(str(e)) from None
        return self._qmp

    def attached(self) -> bool:
        try:
            children = self.qmp.cmd("qom-list", path="/machine/peripheral")
        except QMPError as e:
            raise VfError(str(e)) from None
        return any(c.get("name") == self.id for c in children)

    def detach(self, timeout: float) -> None:
        try:
            self.qmp.cmd("device_del", id=self.id)
            self.qmp.wait_event(
                "DEVICE_DELETED", timeout, lambda ev: ev.get("data", {}).get("device") == self.id
            )
        except QMPError as e:
            raise VfError(str(e)) from None

    def attach(self, on_destination: bool) -> None:
        try:
            self.qmp.cmd("device_add", **self.device)
        except QMPError as e:
            raise VfError(str(e)) from None

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None


def _ids(el: ET.Element) -> list[str]:
    """What finds the VF in the domain XML: its PCI source address, and for an interface its
    MAC (an `<interface type='network'>` from a hostdev pool gets its VF at attach time)."""
    out = []
    a = el.find("./source/address")
    if a is not None and a.get("type", "pci") == "pci":
        try:
            vals = [int(a.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")]
            out.append("{:04x}:{:02x}:{:02x}.{:x}".format(*vals))
        except ValueError:
            pass
    mac = el.find("./mac")
    if el.tag == "interface" and mac is not None and mac.get("address"):
        out.append(mac.get("address", "").lower())
    return out


def _vf_candidates(domain_xml: ET.Element) -> list[ET.Element]:
    """hostdevs and interfaces that are not virtio: the standby shares the VF's MAC."""
    ifaces = [
        i
        for i in domain_xml.findall("./devices/interface")
        if (m := i.find("./model")) is None or m.get("type") != "virtio"
    ]
    return domain_xml.findall("./devices/hostdev") + ifaces


class VirshVf(Vf):
    def __init__(
        self,
        domain: str,
        xml_file: str,
        connect: str | None = None,
        dest_connect: str | None = None,
        virsh: str = "virsh",
        dest_xml_file: str | None = None,
    ) -> None:
        self.domain, self.xml_file, self.virsh = domain, xml_file, virsh
        self.dest_xml_file = dest_xml_file or xml_file  # the destination's VF, if another
        self.connect, self.dest_connect = connect, dest_connect or connect
        self.addr = self._read(xml_file, "--hostdev-xml")  # PCI address, else MAC
        self._read(self.dest_xml_file, "--dest-hostdev-xml")
        self.name = f"VF {self.addr}"

    @staticmethod
    def _read(xml_file: str, option: str) -> str:
        try:
            root = ET.parse(xml_file).getroot()
        except (OSError, ET.ParseError) as e:
            raise ValueError(f"{option} {xml_file}: {e}") from None
        if root.tag not in ("hostdev", "interface"):
            raise ValueError(f"{option} {xml_file}: expected <hostdev> or <interface>")
        ids = _ids(root)
        if not ids:
            raise ValueError(
                f"{option} {xml_file}: neither a PCI <source><address/> nor an interface <mac/>"
            )
        return ids[0]

    def _virsh(self, uri: str | None, *args: str, timeout: float = 60.0) -> str:
        argv = [self.virsh] + (["-c", uri] if uri else []) + list(args)
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise VfError(f"virsh {args[0]}: {e}") from None
        if p.returncode != 0:
            raise VfError(f"virsh {args[0]}: {' '.join(p.stderr.split()) or p.returncode}")
        return p.stdout

    def _attached_at(self, uri: str | None) -> bool:
        xml = self._virsh(uri, "dumpxml", self.domain)
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as e:
            raise VfError(f"virsh dumpxml {self.domain}: {e}") from None
        return any(self.addr in _ids(d) for d in _vf_candidates(root))

    def attached(self) -> bool:
        return self._attached_at(self.connect)

    def detach(self, timeout: float) -> None:
        self._virsh(self.connect, "detach-device", self.domain, self.xml_file, "--live")
        deadline = time.monotonic() + timeout
        while self._attached_at(self.connect):  # libvirt may return before the guest let go
            if time.monotonic() > deadline:
                raise VfError(f"{self.name} still in {self.domain} {timeout:g}s after detach")
            time.sleep(0.2)

    def attach(self, on_destination: bool) -> None:
        if on_destination:
            self._virsh(
                self.dest_connect, "attach-device", self.domain, self.dest_xml_file, "--live"
            )
        else:
            self._virsh(self.connect, "attach-device", self.domain, self.xml_file, "--live")
