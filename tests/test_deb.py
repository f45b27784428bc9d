"""The Debian package: `make deb` builds it (scripts/build-deb), and `apt-get install
./bpfailover_*.deb` installs it on a fresh Debian 12 (a copy of the cached debootstrap
rootfs, in a chroot), with Debian's bcc as a dependency, the agent's venv in /opt/bpfailover,
the unit enabled, the config a conffile that the agent refuses until a group is configured;
purge removes the config.  The build takes a minute or two the first time (the build root is
cached), the install about a minute (the chroot's apt archives are cached)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfailover.datapath import layout
from bpfailover.model import config as configmod

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BPFAILOVER_CACHE", "/var/cache/bpfailover"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SCRIPTS = ("failoverd", "failoverctl", "failover-migrate")
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


def run(argv: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def uncomment(text: str) -> str:
    """The shipped config with its example switched on: `#key` and `#  key` lines lose the
    `#`, prose (`# Text`) stays."""
    return "\n".join(
        ln[1:] if re.match(r"^#(?! \S)", ln) and ln != "#" else ln for ln in text.splitlines()
    )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    p = run(["make", "-s", "-C", str(REPO), "deb", f"DEB_DIR={out}"], timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    debs = sorted(out.glob("bpfailover_*.deb"))
    assert [d.name for d in debs] == [f"bpfailover_{VERSION}_amd64.deb"]
    assert p.stdout.strip().splitlines()[-1] == str(debs[0])
    return debs[0]


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tree")
    assert run(["dpkg-deb", "-x", str(deb), str(out)]).returncode == 0
    return out


def field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


@pytest.mark.root
def test_control_fields_and_conffile(deb: Path, tmp_path: Path) -> None:
    assert field(deb, "Package") == "bpfailover"
    assert field(deb, "Version") == VERSION
    assert field(deb, "Architecture") == "amd64"
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    for pkg in ("python3-bpfcc", "libbpfcc", "iproute2", "ethtool", "kmod"):
        assert pkg in depends
    # The venv is bound to one minor version of Debian's python3.
    assert "python3 (>= 3.11)" in depends and "python3 (<< 3.12)" in depends
    assert field(deb, "Recommends") == "linux-headers-amd64"
    assert run(["dpkg-deb", "-e", str(deb), str(tmp_path / "DEBIAN")]).returncode == 0
    assert (tmp_path / "DEBIAN/conffiles").read_text().split() == ["/etc/bpfailover/config.yaml"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(tmp_path / "DEBIAN" / script, os.X_OK)
    sums = (tmp_path / "DEBIAN/md5sums").read_text()
    assert "  opt/bpfailover/bin/failoverd\n" in sums and "etc/bpfailover" not in sums


@pytest.mark.root
def test_contents(deb: Path, tree: Path) -> None:
    for s in SCRIPTS:
        link = tree / "usr/bin" / s
        assert link.is_symlink() and os.readlink(link) == f"/opt/bpfailover/bin/{s}"
        first = (tree / "opt/bpfailover/bin" / s).read_text().splitlines()[0]
        assert first == "#!/opt/bpfailover/bin/python3"  # made at its final path
    cfg = (tree / "opt/bpfailover/pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and "home = /usr/bin" in cfg
    # Debian's bcc is a dependency, never vendored; the lab is not part of the product.
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    assert "/site-packages/bcc/" not in listing and "bpfailover_lab" not in listing
    assert "/site-packages/bpfailover/agent/main.py" in listing
    bpf = run(["git", "-C", str(REPO), "ls-files", "bpf"]).stdout.split()
    assert bpf and all((tree / "usr/share/bpfailover" / f).is_file() for f in bpf)
    # The shipped unit, as deploy/ has it (ExecStart is the package's /usr/bin/failoverd).
    unit = (tree / "lib/systemd/system/failoverd.service").read_text()
    assert unit == (REPO / "deploy/systemd/failoverd.service").read_text()
    assert "\nExecStart=/usr/bin/failoverd --config /etc/bpfailover/config.yaml\n" in unit
    # Active: the pieces without a MAC; the rest are templates for the operator.
    assert (tree / "lib/systemd/network/00-bpfailover-peer.network").is_file()
    assert (tree / "usr/lib/bpfailover/cloud-init/sitecustomize.py").is_file()
    for u in ("cloud-init-local", "cloud-init", "cloud-config", "cloud-final"):
        assert (tree / f"lib/systemd/system/{u}.service.d/10-bpfailover.conf").is_file()
    for snippet in (
        "udev/80-bpfailover-lowers.rules",
        "udev/81-bpfailover-standby-name.rules",
        "networkd/10-bpfailover-standby.link",
        "networkmanager/90-bpfailover-lowers.conf",
    ):
        assert (tree / "usr/share/bpfailover/deploy" / snippet).is_file()
    assert (
        not (tree / "etc/udev").exists()
        and not (tree / "usr/share/bpfailover/deploy/debian").exists()
    )
    assert (tree / "usr/share/doc/bpfailover/operators.md").is_file()


@pytest.mark.root
def test_operators_install_table_matches_the_package(tree: Path) -> None:
    """Every absolute path in docs/operators.md's "Install" table is in the package."""
    doc = (REPO / "docs/operators.md").read_text()
    section = doc.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split("|")[1] for ln in section.splitlines() if ln.startswith("| `/")]
    paths = [p for row in rows for p in re.findall(r"`(/[^`*]+)`", row)]
    assert len(paths) >= 8, paths
    for path in paths:
        assert os.path.lexists(tree / path.lstrip("/")), path


@pytest.mark.root
def test_shipped_config_is_refused_until_its_example_is_switched_on(tree: Path) -> None:
    text = (tree / "etc/bpfailover/config.yaml").read_text()
    assert text == (REPO / "deploy/config/config.yaml").read_text()
    with pytest.raises(configmod.ConfigError, match="empty config"):
        configmod.parse_config(text, "/etc/bpfailover/config.yaml")
    cfg = configmod.parse_config(uncomment(text), "example")
    assert [g.name for g in cfg.groups] == ["enp1s0"]


def test_bpf_dir_of_an_installed_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A checkout finds its bpf/; an installed package (no bpf/ next to site-packages) finds
    the package's copy; $BPFAILOVER_BPF_DIR wins over both."""
    monkeypatch.delenv("BPFAILOVER_BPF_DIR", raising=False)
    assert layout.bpf_dir() == REPO / "bpf"
    site = tmp_path / "opt/bpfailover/lib/python3.11/site-packages/bpfailover/datapath"
    site.mkdir(parents=True)
    monkeypatch.setattr(layout, "__file__", str(site / "layout.py"))
    assert layout.bpf_dir() == Path("/usr/share/bpfailover/bpf")
    monkeypatch.setenv("BPFAILOVER_BPF_DIR", str(tmp_path))
    assert layout.bpf_dir() == tmp_path


def _fresh_root(root: Path) -> None:
    """A fresh Debian 12 minbase: a copy of scripts/container-image's cached rootfs (never
    the cache itself), else debootstrap."""
    base = CACHE / "rootfs-bookworm"
    if (base / ".complete").exists():
        assert run(["cp", "-a", f"{base}/.", str(root)], timeout=600).returncode == 0
        (root / ".complete").unlink()
    else:
        p = run(["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR], timeout=1800)
        assert p.returncode == 0, p.stderr[-2000:]
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")


@pytest.fixture(scope="module")
def chroot(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package installed with the chroot's own apt, as `apt install ./bpfailover_*.deb`
    would on a guest.  No /proc is mounted (nothing in the install needs it); the apt
    archives are a bind mount of a cache shared by runs, always unmounted."""
    root = tmp_path_factory.mktemp("debian12")
    _fresh_root(root)
    archives = CACHE / "deb-test-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    mnt = root / "var/cache/apt/archives"
    mnt.mkdir(parents=True, exist_ok=True)
    assert run(["mount", "--bind", str(archives), str(mnt)]).returncode == 0
    try:
        shutil.copy(deb, root / "tmp" / deb.name)
        p = in_chroot(root, "apt-get", "update", "-qq", timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        p = in_chroot(root, "apt-get", "install", "-y", "-qq", f"/tmp/{deb.name}", timeout=1800)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        yield root
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=60)
        if not os.path.ismount(mnt):
            shutil.rmtree(root, ignore_errors=True)


def in_chroot(root: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["chroot", str(root), *argv], timeout=timeout, env=CHROOT_ENV)


@pytest.mark.root
def test_installs_on_fresh_debian12(chroot: Path) -> None:
    for s in SCRIPTS:
        p = in_chroot(chroot, s, "--help")
        assert p.returncode == 0 and p.stdout.startswith(f"usage: {s} "), p.stdout + p.stderr
    # Debian's bcc imports from the venv; the datapath sources are found without a checkout.
    p = in_chroot(
        chroot,
        "/opt/bpfailover/bin/python3",
        "-c",
        "import bcc; from bpfailover.datapath import layout; "
        "print(layout.bpf_dir()); print(layout.load().consts['FO_ABI_VERSION'])",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "/usr/share/bpfailover/bpf"
    # Enabled on install (systemctl enable's link; no systemd runs in a chroot) ...
    wants = chroot / "etc/systemd/system/multi-user.target.wants/failoverd.service"
    assert os.readlink(wants) == "/lib/systemd/system/failoverd.service"
    # ... and refused until a group is configured: one line, exit 2 (not restarted).
    p = in_chroot(chroot, "failoverd")
    assert p.returncode == 2
    assert (
        p.stderr
        == "failoverd: /etc/bpfailover/config.yaml: empty config: at least 'groups' is needed\n"
    )
    p = in_chroot(chroot, "dpkg", "--verify", "bpfailover")
    assert p.returncode == 0 and p.stdout == "", p.stdout


@pytest.mark.root
def test_remove_keeps_config_and_purge_removes_it(chroot: Path) -> None:
    p = in_chroot(chroot, "apt-get", "remove", "-y", "-qq", "bpfailover", timeout=600)
    assert p.returncode == 0, p.stderr
    assert not (chroot / "opt/bpfailover").exists() and not (chroot / "usr/bin/failoverd").exists()
    assert (chroot / "etc/bpfailover/config.yaml").is_file()
    p = in_chroot(chroot, "apt-get", "purge", "-y", "-qq", "bpfailover", timeout=600)
    assert p.returncode == 0, p.stderr
    assert not (chroot / "etc/bpfailover").exists()
    assert not (chroot / "etc/systemd/system/multi-user.target.wants/failoverd.service").exists()
    assert in_chroot(chroot, "dpkg", "-s", "bpfailover").returncode != 0
