"""A BPF ring buffer used as a doorbell: the datapath rings it, the agent's event loop wakes.

The records are not read: the fd is readable (poll/epoll) while the ring holds anything,
and drain() moves the consumer position to the producer position, which empties it.  What
rang and why is re-read from the kernel by the work the ring triggers.  Costs nothing while
nobody rings (no timer, no wake-up)."""

from __future__ import annotations

import mmap
import os
import struct

_POS = struct.Struct("=Q")


class Doorbell:
    def __init__(self, map_fd: int) -> None:
        self.fd = os.dup(map_fd)
        page = mmap.PAGESIZE
        # consumer position: the first page, writable; producer position: the second, read-only
        self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._prod = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> int:
        """Empty the ring; returns the bytes it held (0: a spurious wake-up)."""
        prod = _POS.unpack_from(self._prod, 0)[0]
        cons = _POS.unpack_from(self._cons, 0)[0]
        if prod != cons:
            _POS.pack_into(self._cons, 0, prod)  # aligned 8-byte store
        return int(prod - cons)

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
        os.close(self.fd)
