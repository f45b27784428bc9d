"""Proving ground: the kernel's net_failover and bpfailover side by side in a QEMU guest.

`python -m bench.proving_ground` (`make proving-ground`, `make proving-ground-quick`)
builds or reuses a cached Debian guest image (image.py), boots it under QEMU inside a
hypervisor network namespace with tap netdevs bridged to a peer namespace (vm.py), drives
faults over QMP and the guest over a virtio-serial channel (guestd.py runs in the guest),
and runs the same scenario in two modes (run.py). See docs/proving-ground.md.
"""
