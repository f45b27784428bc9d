"""The libvirt pieces operators take from deploy/libvirt/, as the libvirt proving ground
(bench/proving_ground/libvirt.py) puts them into its domain."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from bench.proving_ground import libvirt
from bench.proving_ground.vm import MAC

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "libvirt"


def _alias(el: ET.Element) -> str:
    a = el.find("./alias")
    return "" if a is None else a.get("name", "")


def test_vf_and_standby_share_the_mac_and_differ_by_a_user_alias() -> None:
    # libvirt 9.0 finds an interface to detach by its MAC and refuses when two share it
    # ("multiple devices matching MAC address"): the VF's alias is what it detaches by.
    vf = ET.parse(DEPLOY / "vf-interface.xml").getroot()
    sby = ET.parse(DEPLOY / "standby-interface.xml").getroot()
    assert vf.find("./mac").get("address") == sby.find("./mac").get("address")  # type: ignore[union-attr]
    assert _alias(vf).startswith("ua-") and _alias(sby).startswith("ua-")
    assert _alias(vf) != _alias(sby)
    assert sby.find("./model").get("type") == "virtio"  # type: ignore[union-attr]
    assert sby.find("./link").get("state") == "down"  # type: ignore[union-attr]
    assert sby.find("./teaming") is None  # bpfailover pairs in the guest: failover=off


def test_the_stand_in_vf_is_detached_by_the_deploy_alias() -> None:
    vf = ET.fromstring(libvirt.vf_xml("pgpri"))
    assert _alias(vf) == _alias(ET.parse(DEPLOY / "vf-interface.xml").getroot())
    assert vf.find("./mac").get("address") == MAC  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["kernel", "bpfailover"])
def test_domain_takes_the_deploy_snippets(mode: str, tmp_path: Path) -> None:
    vm = SimpleNamespace(
        argv=lambda: ["qemu-system-x86_64", "-append", "console=ttyS0 quiet"],
        net=SimpleNamespace(tap_sby="pgsby", tap_pri="pgpri"),
        failover=mode == "kernel",
        img=SimpleNamespace(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd"),
        mem_mb=1536,
        workdir=tmp_path,
    )
    root = ET.fromstring(libvirt.domain_xml("it's web 1", vm, tmp_path / "disk.raw"))  # type: ignore[arg-type]
    assert root.findtext("./name") == "it's web 1"
    chans = {c.find("./target").get("name") for c in root.findall("./devices/channel")}  # type: ignore[union-attr]
    assert chans == {"org.qemu.guest_agent.0", "pg"}
    (sby,) = root.findall("./devices/interface")
    assert sby.find("./mac").get("address") == MAC  # type: ignore[union-attr]
    assert sby.find("./link").get("state") == "down"  # type: ignore[union-attr]
    assert sby.find("./target").get("dev") == "pgsby"  # type: ignore[union-attr]
    team = sby.find("./teaming")
    assert (team is not None and team.get("type") == "persistent") == (mode == "kernel")
    assert root.find("./devices/filesystem") is None  # 9p mounted blocks a migration


def test_seed_scripts_parse_and_keep_every_virsh_step() -> None:
    seed = Path(libvirt.__file__).parent / "seed"
    text = ""
    for name in ("source.sh", "destination.sh"):
        subprocess.run(["sh", "-n", str(seed / name)], check=True)
        text += (seed / name).read_text()
    for step in (
        'virsh domif-setlink "$DOMAIN" "$TAP_IF" up',
        'virsh detach-device --live --config "$DOMAIN" "$VF_XML"',
        'virsh migrate --live --persistent "$DOMAIN" "$REMOTE_URI"',
        'virsh attach-device --live --config "$DOMAIN" "$VF_XML"',
        'virsh domif-setlink "$DOMAIN" "$TAP_IF" down',
    ):
        assert step in text


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.xml")), ids=lambda p: p.name)
def test_every_snippet_is_well_formed_xml(path: Path) -> None:
    # virsh reads them with libxml2, which rejects what this parser rejects ("--" in a comment)
    ET.parse(path)


def test_loss_is_split_at_the_migration_window() -> None:
    from bench.proving_ground.libvirt_run import loss_split

    trial = {
        "step": "libvirt-seed",
        "marks": {"migrate": 2.0, "migrated": 5.0},
        # due before the migration, inside it, 1 s after it returned (inside), after that
        "notes": ["lost out at 1.500s+10, 3.000s+200, 6.000s+5, 6.500s+7", "lost in at 4.0s+30"],
    }
    assert loss_split(trial) == {
        "out_migration": 205,
        "out_other": 17,
        "in_migration": 30,
        "in_other": 0,
    }
    assert loss_split({**trial, "marks": {"migrate": 2.0}}) is None  # the migration failed
