"""PNG figures for the results (matplotlib, headless); skipped with a note if it is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import RESULTS, log


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  (matplotlib not installed: no PNG; `pip install -e '.[dev]'`)")
        return None
    return plt


def _save(fig: Any, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    log(f"  wrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def failover(out: dict[str, Any]) -> None:
    plt = _plt()
    if plt is None or not out.get("runs"):
        return
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    for r in out["runs"]:
        lab = f"{r['rate_pps']:,} pps"
        rows = r["rows"]
        ax[0][0].hist([x["g2p_window_ms"] for x in rows], bins=30, alpha=0.6, label=lab)
        ax[0][1].hist([x["g2p_gap_ms"] for x in rows], bins=30, alpha=0.6, label=lab)
        ax[1][0].hist(r["agent_latency_samples_us"]["primary_down"], bins=30, alpha=0.6, label=lab)
        ax[1][1].hist(
            [x["probe_us"] for x in rows if x["probe_us"] is not None],
            bins=30,
            alpha=0.6,
            label=lab,
        )
    titles = [
        ("lost window guest->peer (lost / rate), ms", "trials"),
        ("longest silence guest->peer around the drop, ms", "trials"),
        ("agent: link event received -> map written, us", "switches"),
        ("`ip link set vfport down` -> guest listener hears it, us", "trials"),
    ]
    for a, (t, y) in zip([ax[0][0], ax[0][1], ax[1][0], ax[1][1]], titles, strict=True):
        a.set_title(t, fontsize=10)
        a.set_ylabel(y)
        a.legend()
    fig.suptitle("Unplanned failover: primary carrier loss under a UDP stream")
    _save(fig, "failover")


def throughput(out: dict[str, Any]) -> None:
    plt = _plt()
    if plt is None:
        return
    tests = out["tests"]
    cfgs = out["configs"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(cfgs)
    for j, cfg in enumerate(cfgs):
        ratios = [t["ratio"].get(cfg, 0) or 0 for t in tests]
        ax.bar([i + j * width for i in range(len(tests))], ratios, width, label=cfg)
    ax.axhline(0.95, color="grey", ls="--", lw=0.8)
    ax.axhline(0.90, color="grey", ls=":", lw=0.8)
    ax.set_xticks([i + width * (len(cfgs) - 1) / 2 for i in range(len(tests))])
    ax.set_xticklabels([t["name"] for t in tests], rotation=15, fontsize=8)
    ax.set_ylabel("median / baseline (address on the primary)")
    ax.set_title("Throughput through the failover device vs no failover (same run)")
    ax.legend()
    _save(fig, "throughput")


def scale(out: dict[str, Any]) -> None:
    plt = _plt()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in out["runs"]:
        ax[0].hist(
            r["flap"]["agent_latency_samples_us"], bins=30, alpha=0.6, label=f"{r['groups']} groups"
        )
        ax[1].hist(
            r["flap"]["to_map_samples_ms"], bins=30, alpha=0.6, label=f"{r['groups']} groups"
        )
    ax[0].set_title("agent event -> map write while all groups flap, us", fontsize=10)
    ax[1].set_title("carrier drop request -> map written (polled), ms", fontsize=10)
    for a in ax:
        a.legend()
    _save(fig, "scale")
