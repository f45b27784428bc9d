#!/bin/sh
# The destination hypervisor's half of net_failover.rst's script (see source.sh).
set -eu
: "${DOMAIN:?}" "${TAP_IF:?}" "${VF_XML:?}"
mark() { echo "mark $1"; }

# Attach the VF (the destination's) to the VM.
mark restore
virsh attach-device --live --config "$DOMAIN" "$VF_XML"

# Set the virtio-net interface down.
mark standby_down_req
virsh domif-setlink "$DOMAIN" "$TAP_IF" down
mark standby_down
