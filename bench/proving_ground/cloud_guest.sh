#!/bin/sh
# Cloud-guest variant, inside the guest at boot (pg-deploy.service, before udev's coldplug,
# cloud-init, failoverd and the network managers): copy the snippets of the installed
# bpfailover package into /etc, as an operator would for an image, write the config, and
# pick the stack.  Kernel mode (net_failover) takes none of it, and failoverd.service is
# masked there (the package is in the image, its cloud-init shim does nothing without a
# failover device).
R=/usr/share/bpfailover
arg() { sed -n "s/.*$1=\([a-z]*\).*/\1/p" /proc/cmdline; }
stack=$(arg pgstack)
mode=$(arg pgmode)
# The image is debootstrap minbase: no `locales` package, so cloud-init's locale module
# (update-locale) would fail -- an image defect unrelated to networking (Debian's cloud
# images ship locales).  Both modes get the same setting.
printf 'locale: false\n' > /etc/cloud/cloud.cfg.d/92-pg-locale.cfg
if [ "$stack" = nm ]; then
  printf 'system_info:\n  network:\n    renderers: [network-manager]\n' \
    > /etc/cloud/cloud.cfg.d/91-pg-renderer.cfg
else
  printf 'system_info:\n  network:\n    renderers: [netplan]\n' \
    > /etc/cloud/cloud.cfg.d/91-pg-renderer.cfg
fi
if [ "$mode" = bpfailover ]; then
  install -D -m 644 $R/deploy/udev/80-bpfailover-lowers.rules \
    $R/deploy/udev/81-bpfailover-standby-name.rules \
    $R/deploy/udev/86-bpfailover-nm-managed.rules -t /etc/udev/rules.d/
  # (00-bpfailover-peer.network is active from the package already.)
  install -D -m 644 $R/deploy/networkd/00-bpfailover-lowers.network \
    $R/deploy/networkd/10-bpfailover-standby.link -t /etc/systemd/network/
  # The shipped unit's ProtectKernelModules=yes hides /lib/modules/*/build: bcc then builds
  # against UAPI-only headers copied to /var/cache first -- over 120 s under this TCG guest
  # (the loader's limit).  Full headers: ~60 s.  (docs/cloud-guest.md, proving-ground notes)
  mkdir -p /etc/systemd/system/failoverd.service.d
  printf '[Service]\nProtectKernelModules=no\nTimeoutStartSec=900\n' \
    > /run/pg-zz-boot.conf
  refresh_later=/run/pg-zz-boot.conf
  install -D -m 644 $R/deploy/networkmanager/90-bpfailover-lowers.conf \
    -t /etc/NetworkManager/conf.d/
  mkdir -p /etc/bpfailover
  cat > /etc/bpfailover/config.yaml <<'YAML'
# The standby is enp1s0nsby (81-bpfailover-standby-name.rules); the failover device takes
# enp1s0, the name the virtio NIC had.
groups:
  - name: enp1s0
    standby: {driver: virtio_net}
    primary: auto
metrics:
  listen: null
YAML
fi
# The proving ground's drop-in for failoverd (above).
reload=
refresh() { cmp -s "$1" "$2" || { install -D -m 644 "$1" "$2"; reload=1; }; }
[ -n "$refresh_later" ] && refresh $refresh_later /etc/systemd/system/failoverd.service.d/zz-pg-boot.conf
[ -n "$reload" ] && systemctl daemon-reload
udevadm control --reload 2>/dev/null || true
exit 0
