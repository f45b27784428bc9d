"""The proving ground's accelerator choice (bench/proving_ground/accel.py) with a fake probe:
KVM only when /dev/kvm opens AND a stock kernel boots under it; one probe per host boot."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.proving_ground import accel
from bench.proving_ground.image import Image

IMG = Image(Path("/nonexistent"), Path("d"), Path("k"), Path("i"), {})


class FakeProbe:
    def __init__(self, boots: bool) -> None:
        self.boots, self.calls = boots, 0

    def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        return self.boots, "fake: " + ("booted" if self.boots else "hung after Probing EDD")


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BPFAILOVER_PG_ACCEL", raising=False)


def test_no_kvm_device_means_tcg_without_probing() -> None:
    probe = FakeProbe(True)
    assert accel.decide(False, probe)[0] == "tcg"
    assert probe.calls == 0


def test_kvm_that_does_not_boot_a_stock_kernel_means_tcg() -> None:
    acc, why = accel.decide(True, FakeProbe(False))
    assert acc == "tcg" and "does not boot under it: fake: hung after Probing EDD" in why


def test_kvm_that_boots_means_kvm() -> None:
    assert accel.decide(True, FakeProbe(True))[0] == "kvm"


def test_probe_once_per_host_boot(tmp_path: Path) -> None:
    probe = FakeProbe(False)
    first = accel.detect(IMG, lambda _: None, probe, True, tmp_path, "boot-a")
    again = accel.detect(IMG, lambda _: None, probe, True, tmp_path, "boot-a")
    assert (first["accel"], first["cached"]) == ("tcg", False)
    assert (again["accel"], again["cached"]) == ("tcg", True)
    assert probe.calls == 1
    # a new host boot (another boot id) probes again, and may now find a KVM that works
    other = accel.detect(IMG, lambda _: None, FakeProbe(True), True, tmp_path, "boot-b")
    assert other["accel"] == "kvm"


def test_override_skips_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPFAILOVER_PG_ACCEL", "tcg")
    probe = FakeProbe(True)
    assert accel.detect(IMG, lambda _: None, probe, True, tmp_path, "b")["accel"] == "tcg"
    assert probe.calls == 0
    monkeypatch.setenv("BPFAILOVER_PG_ACCEL", "hvf")
    with pytest.raises(RuntimeError, match="BPFAILOVER_PG_ACCEL='hvf'"):
        accel.detect(IMG, lambda _: None, probe, True, tmp_path, "b")
