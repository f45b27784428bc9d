"""The proving ground's report: bpfailover against the kernel per step and direction."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bench.proving_ground.__main__ import markdown, vs_kernel
from bench.proving_ground.run import StepResult


def _row(mode: str, step: str, out: float, inn: float) -> dict[str, Any]:
    return {"mode": mode, "step": step, "lost_out_p50": out, "lost_in_p50": inn}


def test_vs_kernel_compares_each_direction_and_skips_what_has_no_pair() -> None:
    rows = [
        _row("kernel", "baseline", 0, 0),
        _row("bpfailover", "baseline", 5, 5),  # no fault: not a comparison
        _row("kernel", "flap", 0, 700),
        _row("bpfailover", "flap", 1, 0),  # more out than the kernel, less in
        _row("kernel", "unplug", 0, 300),
        _row("bpfailover", "unplug", 0, 300),  # equal counts as no more
        _row("bpfailover", "planned", 0, 0),  # the kernel cannot do it
    ]
    got = {c["step"]: c for c in vs_kernel(rows)}
    assert sorted(got) == ["flap", "unplug"]
    assert got["flap"]["out"] == [0, 1] and got["flap"]["in"] == [700, 0]
    assert got["flap"]["no_more_than_kernel"] is False
    assert got["unplug"]["no_more_than_kernel"] is True


def test_markdown_says_the_check_state_and_the_comparison() -> None:
    summary = [
        {
            **_row(mode, "flap", out, 0),
            "trials": 1,
            "lost_p50": out,
            "lost_max": out,
            "gap_ms_p50": 1.0,
            "gap_ms_max": 1.0,
            "back_on_primary_ms_p50": None,
            "back_on_primary_ms_max": None,
            "back_missing": 0,
            "end_state_ok": 1,
            "tcp_survived": 1,
            "dp_fallback_p50": fb,
        }
        for mode, out, fb in (("kernel", 0, None), ("bpfailover", 2, 40.0))
    ]
    report = {
        "settings": {
            "rate_pps": 500,
            "tcp_rate": 50,
            "trials": 1,
            "modes": ["kernel", "bpfailover"],
        },
        "guest_kernel": "6.1",
        "qemu": "7.2",
        "summary": summary,
        "datapath_check": "on",
        "vs_kernel": vs_kernel(summary),
        "timings": {"image_build_s": 0, "total_s": 1, "modes": {}},
        "failures": [],
    }
    md = markdown(report)
    assert "lower check ([design](docs/design.md#per-packet-lower-check)): **on**" in md
    assert "flap 40" in md
    assert "- flap: kernel 0 / 0, bpfailover 2 / 0: **more than the kernel**" in md


def test_cloud_report_names_the_replugged_vf() -> None:
    """The cloud variant records the VF's name after each re-plug: udev's predictable name
    once failoverd waits for udev, the kernel's eth<N> when a lower is opened too early."""
    from bench.proving_ground.cloud import vf_names

    boot = {"replugged_vf": [{"name": "enp2s0"}, {"name": "enp2s0"}, {"name": "eth0"}]}
    assert vf_names(boot) == "enp2s0 ×2, eth0 ×1"
    assert vf_names({}) == "–"


# ---- the CI gate: `make proving-ground-quick` exits 1 on what must not happen -------------


def _gate(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    results: list[StepResult],
    check: str | None = "on",
    failures: tuple[str, ...] = (),
) -> int:
    """main() with the guests faked: `results` is what the runs produced."""
    from bench.proving_ground import __main__ as pg

    img = SimpleNamespace(meta={"kernel": "6.1.0-test"})
    monkeypatch.setattr(pg.os, "geteuid", lambda: 0)
    monkeypatch.setattr(pg.image, "ensure_image", lambda **_: (img, 0.0))
    monkeypatch.setattr(
        pg,
        "run",
        lambda _img, _s: {
            "results": results,
            "timings": {},
            "failures": list(failures),
            "datapath_check": check,
        },
    )
    out = tmp_path / "pg.json"
    return pg.main(["--quick", "--steps", "carrier,planned", "--out", str(out)])


def _trial(mode: str, step: str, **kw: Any) -> StepResult:
    good: dict[str, Any] = {"end_on": "primary", "tcp_survived": True, "sent_out": 500}
    return StepResult(mode, step, 0, **(good | kw))


GOOD = [
    _trial("kernel", "carrier"),
    _trial("bpfailover", "carrier"),
    _trial("bpfailover", "planned", marks={"check_ok": 1.0}),
]


def test_gate_passes_a_good_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _gate(monkeypatch, tmp_path, GOOD) == 0
    assert (tmp_path / "pg.md").exists()  # the report is written either way


@pytest.mark.parametrize(
    ("bad", "check", "failures", "says"),
    [
        (_trial("bpfailover", "carrier", end_on="standby"), "on", (), "bpfailover/carrier"),
        (_trial("kernel", "carrier", end_on=None), "on", (), "kernel/carrier"),
        (_trial("bpfailover", "carrier", tcp_survived=False), "on", (), "bpfailover/carrier"),
        (_trial("bpfailover", "planned", marks={"check_ok": 0.0}), "on", (), "bpfailover/planned"),
        (None, "off", (), "the datapath check is 'off'"),
        (None, "mismatch", (), "the datapath check is 'mismatch'"),
        (None, "on", ("bpfailover: guest did not boot",), ""),
    ],
    ids=[
        "wrong-end",
        "kernel-wrong-end",
        "tcp-broken",
        "refusal-check",
        "check-off",
        "check-mismatch",
        "failure",
    ],
)
def test_gate_fails_on_a_wrong_end_broken_tcp_or_the_check_off(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bad: StepResult | None,
    check: str,
    failures: tuple[str, ...],
    says: str,
) -> None:
    results = list(GOOD)
    if bad is not None:  # one more trial of the same step: one bad trial of two fails it
        results.append(bad)
    assert _gate(monkeypatch, tmp_path, results, check, failures) == 1
    assert says in capsys.readouterr().err


def test_image_cache_keeps_another_keys_image_until_it_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building an image for one key never removes the image of another key that a run from
    another working tree may be using; one unused for STALE_AFTER_S goes."""
    from bench.proving_ground import image

    monkeypatch.setattr(image, "CACHE", tmp_path)
    monkeypatch.setattr(image, "ensure_host_packages", lambda log: None)

    def build(out: Path, log: Any) -> None:
        (out / "meta.json").write_text(json.dumps({"key": out.name}))

    image.ensure_image(lambda _: None, key="a", build=build)
    image.ensure_image(lambda _: None, key="b", build=build)
    assert (tmp_path / "a/meta.json").exists() and (tmp_path / "b/meta.json").exists()
    old = time.time() - image.STALE_AFTER_S - 60
    os.utime(tmp_path / "a", (old, old))
    image.ensure_image(lambda _: None, key="c", build=build)
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b/meta.json").exists() and (tmp_path / "c/meta.json").exists()
