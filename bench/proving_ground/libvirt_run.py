"""`python -m bench.proving_ground.libvirt_run [--quick]`: the proving ground under libvirt.

Two libvirtds on this machine (bench/proving_ground/libvirt.py), the guest a libvirt domain
of the first.  Per mode (kernel net_failover, bpfailover) one boot, then per trial:
  libvirt-seed          net_failover.rst's script (bench/proving_ground/seed/), every virsh
                        step as written: domif-setlink up, detach-device, `virsh migrate
                        --live --persistent` to the other libvirtd, attach-device and
                        domif-setlink down there.  Both modes.
  host-migrate-libvirt  deploy/libvirt/failover-migrate-libvirt, the wrapper operators call
                        (failover-migrate --libvirt underneath), to the other libvirtd.
                        bpfailover only.
and once per boot the refusals through the same wrapper (qemu-ga stopped: 3, standby link
down: 5, failoverd stopped: 4; the VF must still be attached).  The bpfailover domain is
named with a quote and a space.  Loss per direction as in the other proving-ground steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.proving_ground import image, libvirt
from bench.proving_ground import run as pg
from bench.proving_ground.run import Mode, Settings, StepResult, Streams
from bench.proving_ground.vm import MAC, Net, VMError
from bpfailover import netns

SEED = Path(__file__).resolve().parent / "seed"
WRAPPER = libvirt.DEPLOY / "failover-migrate-libvirt"
DOMAIN = {"kernel": "pg-kernel", "bpfailover": "pg it's 1"}  # a quote and a space
TAIL_S = 3.0  # streams go on this long after the step's work: where the traffic ends up
STEPS = ("baseline", "libvirt-seed", "host-migrate-libvirt")
REFUSALS = {
    "refuse-no-qga-libvirt": 3,
    "refuse-standby-down-libvirt": 5,
    "refuse-no-failoverd-libvirt": 4,  # last: its restart is the next settle's
}


def _lm(m: Mode) -> libvirt.LibvirtVM:
    assert isinstance(m.vm, libvirt.LibvirtVM)
    return m.vm


def ensure_persistent_with_vf(m: Mode) -> None:
    """The seed's `detach-device --live --config` needs the VF in the persistent definition:
    a domain migrated without --persistent (the wrapper's virsh migrate) is transient on its
    new host, and a VF attached --live only is not in the definition.  Put both right before
    the step, as an operator's definition has them."""
    vm = _lm(m)
    d = vm.daemon
    if d.virsh("dominfo", vm.name).find("Persistent:     yes") < 0:
        xml = vm.workdir / "live.xml"
        xml.write_text(d.virsh("dumpxml", "--migratable", vm.name))
        d.virsh("define", str(xml))
    inactive = ET.fromstring(d.virsh("dumpxml", "--inactive", vm.name))
    if not any(a.get("name") == libvirt.VF_ALIAS for a in inactive.iter("alias")):
        d.virsh("attach-device", vm.name, str(vm.vf_file), "--config")


def _run_marked(
    argv: list[str], env: dict[str, str], st: Streams, marks: dict[str, float], timeout: float
) -> tuple[int, str]:
    """Run a script; each `mark NAME` line it prints is stamped on arrival (stream time)."""
    p = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert p.stdout is not None
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            p.kill()
            p.wait(10)
            return -9, "".join(out) + " (timed out)"
        r, _, _ = select.select([p.stdout], [], [], left)
        if not r:
            continue
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("mark "):
            marks[line.split()[1]] = st.rel(time.monotonic())
        else:
            out.append(line)
    return p.wait(30), "".join(out)


def _step_seed(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    vm = _lm(m)
    src, dst = vm.daemon, vm.other()
    env = {
        **os.environ,
        "DOMAIN": vm.name,
        "TAP_IF": m.net.tap_sby,
        "VF_XML": str(vm.vf_file),
        "MAC": MAC,
        "VF": m.net.tap_pri,
        "REMOTE_URI": dst.uri,
    }
    st.at(0.3)
    # each half on its own hypervisor: its default libvirt URI, its namespace (bridge fdb)
    code, out = _run_marked(
        netns.cmd_in(src.ns, [str(SEED / "source.sh")]),
        {**env, "LIBVIRT_DEFAULT_URI": src.uri},
        st,
        marks,
        300,
    )
    vm.locate()
    if code != 0:
        raise VMError(f"seed source.sh exit {code}: {' '.join(out.split())[-400:]}")
    vm.plugged = False
    code, out = _run_marked(
        netns.cmd_in(dst.ns, [str(SEED / "destination.sh")]),
        {**env, "LIBVIRT_DEFAULT_URI": dst.uri},
        st,
        marks,
        120,
    )
    if code != 0:
        raise VMError(f"seed destination.sh exit {code}: {' '.join(out.split())[-400:]}")
    vm.plugged = True
    vm.probes += 1
    st.at(st.rel(time.monotonic()) + TAIL_S)
    st.stop()


def wrapper(m: Mode, *extra: str) -> tuple[int, dict[str, Any]]:
    """deploy/libvirt/failover-migrate-libvirt DOMAIN DEST_URI VF_XML -- OPTIONS, as an
    operator's tooling calls it (the source libvirtd the default URI)."""
    vm = _lm(m)
    env = {
        **os.environ,
        "LIBVIRT_DEFAULT_URI": vm.daemon.uri,
        "FAILOVER_MIGRATE": str(Path(sys.executable).parent / "failover-migrate"),
    }
    argv = [str(WRAPPER), vm.name, vm.other().uri, str(vm.vf_file), "--"]
    argv += ["--group", m.group, "--json", "--exec-timeout", str(pg.FM_EXEC_TIMEOUT), *extra]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    res = pg._last_json(p.stdout)
    res["stderr"] = p.stderr.strip()
    return p.returncode, res


def _step_host_migrate(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    vm = _lm(m)
    st.at(0.5)
    t0 = st.rel(time.monotonic())
    marks["fault"] = t0
    code, res = wrapper(m, "--return-timeout", "120")
    marks["tool_s"] = round(st.rel(time.monotonic()) - t0, 3)
    vm.locate()
    vm.plugged = vm.vf_present()
    if vm.plugged:
        vm.probes += 1
    for k, v in res.get("marks", {}).items():
        marks[f"fm_{k}"] = round(t0 + v, 3)
    if "fm_migrated" in marks:
        marks["restore"] = marks["fm_migrated"]  # just before its attach-device
    if code != 0:
        marks["fm_exit"] = float(code)
        m.s.log(f"[{m.name}] failover-migrate-libvirt exit {code}: {res.get('stderr', '')[-300:]}")
    st.at(st.rel(time.monotonic()) + TAIL_S)
    st.stop()


def _refusal(m: Mode, marks: dict[str, float], expect: int) -> None:
    vm = _lm(m)
    code, res = wrapper(m, "--agent-timeout", str(pg.FM_AGENT_TIMEOUT))
    vm.locate()
    attached = vm.vf_present()
    marks["exit"] = float(code)
    marks["vf_attached"] = 1.0 if attached else 0.0
    marks["check_ok"] = 1.0 if code == expect and attached else 0.0
    m.s.log(f"[{m.name}] failover-migrate-libvirt exit {code} (want {expect}): {res['stderr']}")
    if not attached:
        vm.plugged = False


def _refuse_no_qga(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.3)
    m.g.sh(f"kill $(cat {pg.QGA_PIDFILE}) && while [ -e {pg.QGA_PIDFILE} ]; do sleep 0.1; done")
    _refusal(m, marks, REFUSALS["refuse-no-qga-libvirt"])


def _refuse_standby_down(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.3)
    m.vm.set_link("net0", False)

    def unusable() -> bool:
        s = m.agent_status()
        return bool(s and not any(lw["role"] == "standby" and lw["usable"] for lw in s["lowers"]))

    m.wait(unusable, 10, "the standby unusable in failoverd")
    _refusal(m, marks, REFUSALS["refuse-standby-down-libvirt"])


def _refuse_no_failoverd(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.3)
    assert m.agent_h is not None
    m.g.req("kill", h=m.agent_h, sig=15)
    if m.g.req("wait", h=m.agent_h, timeout=60).get("rc") is None:
        m.g.req("kill", h=m.agent_h, sig=9)
        m.g.req("wait", h=m.agent_h, timeout=30)
    m.agent_h = None
    _refusal(m, marks, REFUSALS["refuse-no-failoverd-libvirt"])


# The proving ground's step machinery (run.run_step: settle, streams, loss per direction)
# takes these steps as its own.
pg.STEPS |= {
    "libvirt-seed": _step_seed,
    "host-migrate-libvirt": _step_host_migrate,
    "refuse-no-qga-libvirt": _refuse_no_qga,
    "refuse-standby-down-libvirt": _refuse_standby_down,
    "refuse-no-failoverd-libvirt": _refuse_no_failoverd,
}
pg.STEP_DURATION |= {k: 12.0 for k in REFUSALS}
pg.AFTER_STEP |= {
    "refuse-no-qga-libvirt": pg._restart_qga,
    "refuse-standby-down-libvirt": pg._standby_back,
}
pg.STANDBY_DOWN_AT_START.add("libvirt-seed")
pg.STOPPABLE |= {"libvirt-seed", "host-migrate-libvirt"}


def run(img: image.Image, s: Settings, steps: tuple[str, ...]) -> dict[str, Any]:
    results: list[StepResult] = []
    timings: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    net = Net(s.prefix)
    hosts = libvirt.Hosts(net)
    for mode in s.modes:
        t_mode = time.monotonic()
        daemons: list[libvirt.Libvirtd] = []
        watch: libvirt.MultiWatch | None = None
        m = Mode(mode, img, net, s)
        try:
            hosts.up()
            for i, ns in enumerate((net.hv, hosts.hv2)):
                d = libvirt.Libvirtd(
                    ns,
                    s.workdir / f"libvirtd{i + 1}",
                    str(uuid.uuid4()),
                    f"{s.prefix}-hv{i + 1}",
                    libvirt.Hosts.MIG[i],
                )
                daemons.append(d)
                d.start()
            m.vm = libvirt.LibvirtVM(img, net, mode, s.workdir / mode, daemons, DOMAIN[mode])
            watch = hosts.watch()
            s.log(f"[{mode}] booting domain {DOMAIN[mode]!r} under libvirtd (TCG)")
            m.start()
            s.log(f"[{mode}] ready: boot {m.timings['boot_s']:.1f}s")
            # failover-migrate and its refusals need failoverd: bpfailover only
            todo = [st for st in steps if st in ("baseline", "libvirt-seed")]
            if mode == "bpfailover":
                todo += [st for st in steps if st not in todo]
            for trial in range(s.trials):
                for step in todo:
                    if (step == "baseline" or step in REFUSALS) and trial > 0:
                        continue
                    if step == "libvirt-seed":
                        ensure_persistent_with_vf(m)
                    r = pg.run_step(m, watch, step, trial)  # type: ignore[arg-type]
                    r.notes.append(f"on {_lm(m).daemon.hostname} after the step")
                    results.append(r)
                    s.log(
                        f"[{mode}] trial {trial + 1}/{s.trials} {step:<21} lost "
                        f"{r.lost_out:>4}/{r.lost_in:<4} gap {r.gap_out_ms:>7.1f}/"
                        f"{r.gap_in_ms:<7.1f}ms end {r.end_on} tcp "
                        f"{'ok' if r.tcp_survived else 'FAILED ' + str(r.tcp_error)} "
                        f"now on {_lm(m).daemon.hostname}"
                    )
        except Exception as e:
            failures.append(f"{mode}: {e}")
            s.log(f"[{mode}] FAILED: {e}")
        finally:
            if mode == "bpfailover" and m.vm.guest is not None:
                with contextlib.suppress(Exception):
                    (s.workdir / "failoverd.log").write_text(m.agent_log())
            with contextlib.suppress(Exception):
                m.close()
            for d in daemons:
                d.close()
            if watch is not None:
                watch.close()
            hosts.down()
        timings[mode] = {**m.timings, "total_s": time.monotonic() - t_mode}
    return {"results": results, "timings": timings, "failures": failures}


# A hole counts as the migration's when the packets were due between the migration's start
# (the seed's `virsh migrate`, the tool's end of detach) and 1 s after it returned.
MIGRATION_WINDOW = {
    "libvirt-seed": ("migrate", "migrated"),
    "host-migrate-libvirt": ("fm_detached", "fm_migrated"),
}


def loss_split(trial: dict[str, Any]) -> dict[str, int] | None:
    """Lost packets per direction inside the migration window and outside it (from the
    trial's notes `lost out at 1.234s+56, ...` and its marks)."""
    keys = MIGRATION_WINDOW.get(trial["step"])
    marks = trial["marks"]
    if keys is None or not all(k in marks for k in keys):
        return None
    t0, t1 = marks[keys[0]], marks[keys[1]] + 1.0
    out = {"out_migration": 0, "out_other": 0, "in_migration": 0, "in_other": 0}
    for note in trial["notes"]:
        if not note.startswith("lost "):
            continue
        direction = note.split()[1]
        for hole in note.split(" at ", 1)[1].split(", "):
            at, n = hole.split("s+")
            where = "migration" if t0 <= float(at) <= t1 else "other"
            out[f"{direction}_{where}"] += int(n)
    return out


def split_notes(trials: list[dict[str, Any]]) -> list[str]:
    out = []
    for step in MIGRATION_WINDOW:
        for mode in ("kernel", "bpfailover"):
            rows = [
                sp
                for t in trials
                if t["step"] == step and t["mode"] == mode and (sp := loss_split(t)) is not None
            ]
            if not rows:
                continue
            fmt = ", ".join(
                f"{r['out_migration']}/{r['in_migration']} in it, "
                f"{r['out_other']}/{r['in_other']} outside"
                for r in rows
            )
            out.append(f"- {step}, {mode} (out/in, per trial): {fmt}")
    return out


def notes(summary: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in summary:
        if r.get("send_errors_out_max"):
            out.append(
                f"- {r['step']} ({r['mode']}): of the lost out, up to {r['send_errors_out_max']} "
                "per trial never left the guest (its UDP sender refused with EAGAIN: a stalled "
                "vCPU's backlog sent at once); lost beyond those: "
                f"{r['lost_beyond_send_errors_max']} max"
            )
        if r["step"] == "host-migrate-libvirt":
            out.append(
                f"- host-migrate-libvirt: 0 lost both ways in {r['lost_both_ways_zero']}/"
                f"{r['trials']}; the tool failed in {r['tool_failed']}; the whole sequence "
                f"(three failoverctl runs through qemu-ga, detach, `virsh migrate --live`, "
                f"attach, the VF's link-up) took {pg.fmt(r['tool_s_p50'])} s p50, "
                f"{pg.fmt(r['tool_s_max'])} max"
            )
        elif r["step"] in REFUSALS:
            ok = r["trials"] - r.get("checks_failed", 0)
            out.append(
                f"- {r['step']}: refused with exit {', '.join(map(str, r['exit_codes']))} "
                f"(want {REFUSALS[r['step']]}), VF still attached: {ok}/{r['trials']}"
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Proving ground under libvirt: net_failover.rst's script and failover-migrate-libvirt",
        "",
        f"libvirt {report['libvirt']} (two libvirtds on one machine, each in its own network, "
        f"mount and UTS namespaces; `virsh migrate --live` between them), QEMU "
        f"{report['qemu']} TCG, guest kernel {report['guest_kernel']}: a `type='qemu'` "
        "domain with deploy/libvirt/'s standby and guest-agent channel, an emulated e1000e "
        f"standing in for the VF (same MAC).  UDP {s['rate_pps']} pps each way (64 B) + TCP "
        f"{s['tcp_rate']}×1000 B/s guest→peer per step; {s['trials']} trial(s) per step. "
        f"Domains: {', '.join(repr(d) for d in DOMAIN.values())}. "
        f"Generated by `{report['command']}` (docs/host-migration.md, "
        '"Tested under libvirt").',
        "",
    ]
    lines += pg.steps_table(report["summary"])
    extra = notes(report["summary"])
    if extra:
        lines += ["", "Notes:", *extra]
    split = split_notes(report["trials"])
    if split:
        lines += [
            "",
            "Where the loss fell: in the migration's window (from `virsh migrate` to 1 s after "
            "it returned: the guest paused for its last pages, its frames then leaving from the "
            "other host, the bridges relearning its MAC) or outside it:",
            *split,
        ]
    t = report["timings"]
    lines += [
        "",
        "Runtimes: "
        + ", ".join(
            [f"total {t['total_s']:.0f}s"]
            + [
                f"{k} {v['total_s']:.0f}s (boot {v.get('boot_s', 0):.0f}s)"
                for k, v in t["modes"].items()
            ]
        )
        + ".",
    ]
    if report["failures"]:
        lines += ["", "**Failures:** " + "; ".join(report["failures"])]
    return "\n".join(lines) + "\n"


def _on_term(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.proving_ground.libvirt_run")
    ap.add_argument("--render", type=Path, help="only rewrite the .md of this JSON report")
    ap.add_argument("--quick", action="store_true", help="one trial per step")
    ap.add_argument("--trials", type=int, help="trials per step (default 5; --quick: 1)")
    ap.add_argument("--modes", default="kernel,bpfailover")
    ap.add_argument("--steps", default=",".join([*STEPS, *REFUSALS]))
    ap.add_argument("--out", type=Path, help="JSON path (the .md goes next to it)")
    args = ap.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        return 0
    if os.geteuid() != 0:
        print("proving ground: needs root (namespaces, taps, libvirtd)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_term)
    t0 = time.monotonic()
    trials = args.trials or (1 if args.quick else 5)
    suffix = "_quick" if args.quick else ""
    out = args.out or image.REPO / "bench" / "results" / f"proving_ground_libvirt{suffix}.json"
    steps = tuple(args.steps.split(","))
    unknown = [st for st in steps if st not in pg.STEPS or st not in (*STEPS, *REFUSALS)]
    if unknown:
        print(f"proving ground: unknown step(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        libvirt.ensure_host_packages()
        img, _ = image.ensure_image()
        s = Settings(trials=trials, modes=tuple(args.modes.split(",")), steps=steps)
        got = run(img, s, steps)
    except KeyboardInterrupt:
        print("proving ground: interrupted (cleaned up)", file=sys.stderr)
        return 130
    except (image.ImageError, RuntimeError) as e:
        print(f"proving ground: {e}", file=sys.stderr)
        return 1
    ver = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=False)
    qemu = os.popen("qemu-system-x86_64 --version").read().split()[3:4]
    cmd = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    env = " ".join(
        f"{k}={os.environ[k]}"
        for k in ("BPFAILOVER_PG_PREFIX", "BPFAILOVER_PG_CACHE")
        if k in os.environ
    )
    report: dict[str, Any] = {
        "command": f"{env} python -m bench.proving_ground.libvirt_run {cmd}".strip(),
        "settings": {
            "trials": s.trials,
            "rate_pps": s.rate_pps,
            "tcp_rate": s.tcp_rate,
            "modes": list(s.modes),
            "steps": list(steps),
        },
        "libvirt": ver.stdout.strip(),
        "qemu": qemu[0] if qemu else "?",
        "guest_kernel": img.meta.get("kernel"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "timings": {"total_s": round(time.monotonic() - t0, 1), "modes": got["timings"]},
        "failures": got["failures"],
        "summary": pg.summarize(got["results"]) if got["results"] else [],
        "trials": [{**asdict(r), "lost": r.lost, "gap_ms": r.gap_ms} for r in got["results"]],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    bad = [
        f"{r['mode']}/{r['step']}"
        for r in report["summary"]
        if r["end_state_ok"] < r["trials"]
        or r["tcp_survived"] < r["trials"]
        or r.get("checks_failed")
        or r.get("tool_failed")
    ]
    if bad:
        print(f"proving ground: wrong end state, TCP broken or a check failed in {bad}")
    return 1 if got["failures"] or bad else 0


if __name__ == "__main__":
    sys.exit(main())
