#!/bin/sh
# The source hypervisor's half of net_failover.rst's live-migration script (the kernel's
# Documentation/networking/net_failover.rst), every virsh step as written there.  The
# proving ground runs it against its libvirt domain (bench/proving_ground/libvirt.py) with
# the document's variables in the environment.  What it cannot run: the PF's VF MAC reset
# (`ip link set $PF vf $VF_NUM mac $ZERO_MAC`, no SR-IOV here) and the `bridge fdb add` that
# keeps the PF's embedded switch sending to the VF's representor (no PF: the VF's host side
# is a tap on br0, whose learned entry is dropped instead, as bench/proving_ground/run.py's
# `migration` step does).  Quoted variables: a domain name with a space stays one word.
set -eu
: "${DOMAIN:?}" "${TAP_IF:?}" "${VF_XML:?}" "${MAC:?}" "${VF:?}" "${REMOTE_URI:?}"
mark() { echo "mark $1"; }

# Set the virtio-net interface up.
mark standby_up
virsh domif-setlink "$DOMAIN" "$TAP_IF" up

# Remove the VF that was passthrough'd to the VM.
mark fault
virsh detach-device --live --config "$DOMAIN" "$VF_XML"
mark deleted

bridge fdb del "$MAC" dev "$VF" master 2>/dev/null || true

# Migrate the VM
mark migrate
virsh migrate --live --persistent "$DOMAIN" "$REMOTE_URI"
mark migrated
