#!/bin/sh
# Cloud-guest variant, inside the guest at boot (pg-deploy.service, before udev's coldplug,
# cloud-init, failoverd and the network managers): install bpfailover's deploy/ snippets from
# the live repository, as an operator would copy them into an image, and pick the stack.
# Kernel mode (net_failover) is the guest without bpfailover: nothing of it is installed.
R=/opt/bpfailover
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
  install -D -m 644 $R/deploy/networkd/00-bpfailover-lowers.network \
    $R/deploy/networkd/00-bpfailover-peer.network \
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
  install -D -m 644 $R/deploy/cloud-init/sitecustomize.py \
    /usr/lib/bpfailover/cloud-init/sitecustomize.py
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
# The venv's console scripts as the working tree's pyproject.toml has them (the editable
# install made at build time wrote the entry points of that day).
/opt/bpfailover-venv/bin/python3 - <<'PY'
import tomllib
from pathlib import Path
scripts = tomllib.loads(Path("/opt/bpfailover/pyproject.toml").read_text())["project"]["scripts"]
for name, target in scripts.items():
    mod, func = target.split(":")
    Path(f"/opt/bpfailover-venv/bin/{name}").write_text(
        f"#!/opt/bpfailover-venv/bin/python3\nimport sys\nfrom {mod} import {func}\n"
        f"sys.exit({func}())\n"
    )
    Path(f"/opt/bpfailover-venv/bin/{name}").chmod(0o755)
PY
# The units as the working tree has them (the image has the copy made at build time).
reload=
refresh() { cmp -s "$1" "$2" || { install -D -m 644 "$1" "$2"; reload=1; }; }
refresh $R/deploy/systemd/failoverd.service /etc/systemd/system/failoverd.service
for u in cloud-init-local cloud-init cloud-config cloud-final; do
  refresh $R/deploy/cloud-init/10-bpfailover.conf /etc/systemd/system/$u.service.d/10-bpfailover.conf
done
[ -n "$refresh_later" ] && refresh $refresh_later /etc/systemd/system/failoverd.service.d/zz-pg-boot.conf
[ -n "$reload" ] && systemctl daemon-reload
udevadm control --reload 2>/dev/null || true
exit 0
