"""Real-time scheduling for the agent's event loop.

Under load (traffic softirqs and user processes on every CPU) a SCHED_OTHER agent waits
its turn after the carrier event arrives; at 80k pps on 2 vCPUs SCHED_FIFO cut the
event->map-write p99 from 0.63 to 0.34 ms (`make bench`: the failover table's baseline
row). The loop blocks in select() between events (0 wake-ups at idle), so a FIFO priority
costs nothing while idle, and the kernel's RT throttling (95 %) bounds a runaway."""

from __future__ import annotations

import os

SCHED_RESET_ON_FORK = 0x40000000  # children (the bcc loader on a re-pin) start at normal


def go_realtime(priority: int) -> str:
    """Put the calling thread (only: other threads keep their policy) under SCHED_FIFO at
    `priority`; 0 leaves it alone. Returns what it runs under; raises OSError (EPERM
    without CAP_SYS_NICE) and then changes nothing."""
    if priority:
        os.sched_setscheduler(0, os.SCHED_FIFO | SCHED_RESET_ON_FORK, os.sched_param(priority))
    return current()


def current() -> str:
    """The calling thread's policy, as `fifo:10` or `other`."""
    policy = os.sched_getscheduler(0) & ~SCHED_RESET_ON_FORK
    if policy == os.SCHED_FIFO:
        return f"fifo:{os.sched_getparam(0).sched_priority}"
    if policy == os.SCHED_RR:
        return f"rr:{os.sched_getparam(0).sched_priority}"
    return "other"
