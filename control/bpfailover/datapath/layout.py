"""Map layouts read from bpf/failover.h, the one place they are written.

Only the restricted C the header promises is understood: integer `#define`s
(numbers or arithmetic over earlier defines), function-like index macros, and
structs of __u32/__u64/char[N] members.  The control plane does not parse the
header at run time: `python -m bpfailover.datapath.layout --generate >
control/bpfailover/datapath/layout_gen.py` writes it out as a typed module
(tests/test_layout.py checks that module is current).
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import os
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

from bpfailover.datapath.layout_gen import FO_SLOT_NONE, names

_CTYPES: dict[str, type] = {"__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64}
_CTYPE_NAMES = {"__u32": "ctypes.c_uint32", "__u64": "ctypes.c_uint64"}


# Where the Debian package (scripts/build-deb) puts the BPF sources: an installed package
# has no checkout around it.
PACKAGED_BPF_DIR = Path("/usr/share/bpfailover/bpf")


def bpf_dir() -> Path:
    """$BPFAILOVER_BPF_DIR, else the checkout's bpf/ (a source tree, `pip install -e`), else
    the package's copy."""
    env = os.environ.get("BPFAILOVER_BPF_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[3] / "bpf"
    return checkout if checkout.is_dir() else PACKAGED_BPF_DIR


def _eval(expr: str, env: dict[str, int]) -> int:
    tree = ast.parse(expr.strip(), mode="eval")

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            ops: dict[type, Callable[[int, int], int]] = {
                ast.Add: lambda x, y: x + y,
                ast.Sub: lambda x, y: x - y,
                ast.Mult: lambda x, y: x * y,
                ast.LShift: lambda x, y: x << y,
                ast.BitOr: lambda x, y: x | y,
            }
            return ops[type(node.op)](a, b)
        raise ValueError(f"failover.h: unsupported expression {expr!r}")

    return walk(tree)


class Layout:
    """Constants, index macros, structs and map shapes of failover.h, parsed."""

    def __init__(self, text: str) -> None:
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        self.consts: dict[str, int] = {}
        self.exprs: dict[str, str] = {}  # each constant as written (a number or arithmetic)
        self.macros: dict[str, tuple[list[str], str]] = {}
        for m in re.finditer(
            r"^#define[ \t]+(FO_\w+)(\(([^)]*)\))?[ \t]+([^\n]+)$", text, flags=re.M
        ):
            name, args, body = m.group(1), m.group(3), m.group(4)
            if args is not None:
                params = [a.strip() for a in args.split(",")]
                _eval(body, {**self.consts, **dict.fromkeys(params, 1)})  # arithmetic only
                self.macros[name] = (params, body.strip())
            else:
                try:
                    self.consts[name] = _eval(body, self.consts)
                except (KeyError, SyntaxError, ValueError):
                    continue  # not an integer define (none today)
                self.exprs[name] = body.strip()
        # struct name -> [(member, C type, array length or 0)]
        self.members: dict[str, list[tuple[str, str, int]]] = {}
        self.structs: dict[str, type[ctypes.Structure]] = {}
        for m in re.finditer(r"struct\s+(\w+)\s*\{([^}]*)\};", text):
            members: list[tuple[str, str, int]] = []
            fields: list[tuple[str, type]] = []
            for decl in m.group(2).split(";"):
                decl = decl.strip()
                if not decl:
                    continue
                arr = re.fullmatch(r"char\s+(\w+)\[(\d+)\]", decl)
                if arr:
                    members.append((arr.group(1), "char", int(arr.group(2))))
                    fields.append((arr.group(1), ctypes.c_char * int(arr.group(2))))
                    continue
                ctype, fname = decl.split()
                members.append((fname, ctype, 0))
                fields.append((fname, _CTYPES[ctype]))
            self.members[m.group(1)] = members
            self.structs[m.group(1)] = type(m.group(1), (ctypes.Structure,), {"_fields_": fields})

        # The maps as the BPF build declares them: name -> (key, value, max_entries), each
        # as Python source: a size in bytes, or the struct's ctypes.sizeof(); max_entries a
        # number or a constant's name (a ring buffer's: its pages in bytes).
        self.maps: dict[str, tuple[str, str, str]] = {}
        for m in re.finditer(
            r"BPF_TABLE\(\s*\"\w+\"\s*,\s*([\w ]+?)\s*,\s*([\w ]+?)\s*,\s*(\w+)\s*,"
            r"\s*(\w+)\s*\)",
            text,
        ):
            key, value, name, entries = m.groups()
            self.maps[name] = (self._size(key), self._size(value), self._entries(entries))
        for m in re.finditer(r"BPF_DEVMAP\(\s*(\w+)\s*,\s*(\w+)\s*\)", text):
            self.maps[m.group(1)] = ("4", "4", self._entries(m.group(2)))  # bcc: int -> int
        for m in re.finditer(r"BPF_RINGBUF_OUTPUT\(\s*(\w+)\s*,\s*(\w+)\s*\)", text):
            # a ring buffer: no key or value, max_entries is its size in bytes
            pages = self._entries(m.group(2))
            self.maps[m.group(1)] = ("0", "0", f"{pages} * mmap.PAGESIZE")

    def _size(self, ctype: str) -> str:
        scalars = {"__u32": "4", "__u64": "8", "int": "4"}
        if ctype in scalars:
            return scalars[ctype]
        m = re.fullmatch(r"struct (\w+)", ctype)
        if m is None or m.group(1) not in self.structs:
            raise ValueError(f"failover.h: unknown map key or value type {ctype!r}")
        return f"ctypes.sizeof({m.group(1)})"

    def _entries(self, token: str) -> str:
        if not token.isdigit() and token not in self.consts:
            raise ValueError(f"failover.h: unknown map size {token!r}")
        return token

    def names(self, prefix: str) -> tuple[str, ...]:
        """Lower-case names of an enum-like family, by value: names("FO_DROP_") ->
        ("no_lower", "inactive_rx").  Counts (FO_N*) do not share the prefix."""
        family = {
            k[len(prefix) :].lower(): v for k, v in self.consts.items() if k.startswith(prefix)
        }
        return tuple(sorted(family, key=family.__getitem__))

    def families(self) -> dict[str, tuple[str, ...]]:
        """The enum-like families: FO_<WORD>_* constants whose values are 0..n-1."""
        out: dict[str, tuple[str, ...]] = {}
        for name in self.consts:
            m = re.match(r"FO_[A-Z]+_", name)
            if m is None or m.group(0) in out:
                continue
            prefix = m.group(0)
            values = sorted(v for k, v in self.consts.items() if k.startswith(prefix))
            if len(values) > 1 and values == list(range(len(values))):
                out[prefix] = self.names(prefix)
        return out


@cache
def load() -> Layout:
    return Layout((bpf_dir() / "failover.h").read_text())


def _py(expr: str) -> str:
    """A C arithmetic expression of the header as Python (the same operators)."""
    return ast.unparse(ast.parse(expr, mode="eval"))


def generate(lay: Layout) -> str:
    """layout_gen.py: the header's layouts as a typed module (no parsing, no eval)."""
    out = [
        '"""bpf/failover.h as Python: its constants, index macros, structs and map shapes.',
        "",
        "Generated by `python -m bpfailover.datapath.layout --generate` from the header: do not",
        "edit (tests/test_layout.py checks that it is current).",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import ctypes",
        "import mmap",
        "from typing import Final",
        "",
    ]
    for name, expr in lay.exprs.items():
        out.append(f"{name}: Final[int] = {_py(expr)}")
    for name, (params, body) in lay.macros.items():
        args = ", ".join(f"{p}: int" for p in params)
        out += ["", "", f"def {name}({args}) -> int:", f"    return {_py(body)}"]
    for sname, members in lay.members.items():
        out += ["", "", f"class {sname}(ctypes.Structure):", "    _fields_ = ["]
        for fname, ctype, n in members:
            t = f"ctypes.c_char * {n}" if n else _CTYPE_NAMES[ctype]
            out.append(f'        ("{fname}", {t}),')
        out.append("    ]")
        for fname, _ctype, n in members:
            out.append(f"    {fname}: {'bytes' if n else 'int'}")
    out += [
        "",
        "",
        "# Enum-like families (FO_<WORD>_* valued 0..n-1): their lower-case names by value.",
        "NAMES: Final[dict[str, tuple[str, ...]]] = {",
    ]
    for prefix, family in lay.families().items():
        quoted = ", ".join(f'"{n}"' for n in family)
        out.append(f'    "{prefix}": ({quoted}),')
    out += [
        "}",
        "",
        "# The maps as the BPF build declares them: name -> (key size, value size, max_entries),",
        "# compared with what a pinned datapath really has (a ring buffer's in bytes).",
        "MAP_SHAPES: Final[dict[str, tuple[int, int, int]]] = {",
    ]
    for mname, (key, value, entries) in lay.maps.items():
        out.append(f'    "{mname}": ({key}, {value}, {entries}),')
    out += [
        "}",
        "",
        "",
        "def names(prefix: str) -> tuple[str, ...]:",
        '    """Lower-case names of an enum-like family, by value: names("FO_DROP_") ->',
        '    ("no_lower", "inactive_rx", "loop")."""',
        "    return NAMES[prefix]",
    ]
    return "\n".join(out) + "\n"


# Slot number -> role name of the lower slots (FO_SLOT_* without NONE), and back.
SLOT_NAMES: dict[int, str] = {
    slot: name for slot, name in enumerate(names("FO_SLOT_")) if slot != FO_SLOT_NONE
}
ROLE_SLOTS: dict[str, int] = {name: slot for slot, name in SLOT_NAMES.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpfailover.datapath.layout")
    ap.add_argument(
        "--generate",
        action="store_true",
        help="print layout_gen.py, generated from failover.h (redirect it into the module)",
    )
    args = ap.parse_args(argv)
    if not args.generate:
        ap.print_usage(sys.stderr)
        return 2
    sys.stdout.write(generate(load()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
