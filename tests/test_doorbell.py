"""The ring-buffer doorbell: readable once rung, empty after drain, and still rings after
the ring ran full (records are never read, only counted as bytes)."""

from __future__ import annotations

import os
import selectors

import pytest

from bpfailover.datapath import bpfsys, kheaders
from bpfailover.datapath.doorbell import Doorbell

pytestmark = pytest.mark.root

SRC = r"""
#include <uapi/linux/bpf.h>
BPF_RINGBUF_OUTPUT(ev, 1);
int ring(struct __sk_buff *skb)
{
    __u32 g = 7;
    ev.ringbuf_output(&g, sizeof(g), BPF_RB_FORCE_WAKEUP);
    return 0;
}
"""


def test_doorbell_rings_drains_and_survives_a_full_ring() -> None:
    os.environ.update(kheaders.find().env)
    from bcc import BPF

    b = BPF(text=SRC)
    fd = b.load_func("ring", BPF.SCHED_CLS).fd
    bell = Doorbell(b["ev"].map_fd)
    sel = selectors.DefaultSelector()
    sel.register(bell, selectors.EVENT_READ)
    try:
        assert sel.select(0) == []  # nothing rang: not readable, no wake-up
        bpfsys.prog_test_run(fd, b"\0" * 64)
        bpfsys.prog_test_run(fd, b"\0" * 64)
        assert len(sel.select(0)) == 1
        assert bell.drain() == 2 * 16  # two records of 8-byte header + 4 bytes, rounded
        assert sel.select(0) == [] and bell.drain() == 0
        for _ in range(1000):  # more than one page holds: the ring runs full
            bpfsys.prog_test_run(fd, b"\0" * 64)
        assert len(sel.select(0)) == 1 and bell.drain() > 0
        bpfsys.prog_test_run(fd, b"\0" * 64)
        assert len(sel.select(0)) == 1 and bell.drain() == 16
    finally:
        sel.close()
        bell.close()
        b.cleanup()
