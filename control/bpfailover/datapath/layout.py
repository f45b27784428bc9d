"""Map layouts read from bpf/failover.h, the one place they are written.

Only the restricted C the header promises is understood: integer `#define`s
(numbers or arithmetic over earlier defines), function-like index macros, and
structs of __u32/__u64/char[N] members.
"""

from __future__ import annotations

import ast
import ctypes
import mmap
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

_CTYPES: dict[str, type] = {"__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64}


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
    """Constants, index helpers and ctypes structs of failover.h."""

    def __init__(self, text: str) -> None:
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        self.consts: dict[str, int] = {}
        self._macros: dict[str, tuple[list[str], str]] = {}
        for m in re.finditer(
            r"^#define[ \t]+(FO_\w+)(\(([^)]*)\))?[ \t]+([^\n]+)$", text, flags=re.M
        ):
            name, args, body = m.group(1), m.group(3), m.group(4)
            if args is not None:
                self._macros[name] = ([a.strip() for a in args.split(",")], body)
            else:
                try:
                    self.consts[name] = _eval(body, self.consts)
                except (KeyError, SyntaxError, ValueError):
                    continue  # not an integer define (none today)
        self._compiled: dict[str, Callable[..., int]] = {}
        self.structs: dict[str, type[ctypes.Structure]] = {}
        for m in re.finditer(r"struct\s+(\w+)\s*\{([^}]*)\};", text):
            fields: list[tuple[str, type]] = []
            for decl in m.group(2).split(";"):
                decl = decl.strip()
                if not decl:
                    continue
                arr = re.fullmatch(r"char\s+(\w+)\[(\d+)\]", decl)
                if arr:
                    fields.append((arr.group(1), ctypes.c_char * int(arr.group(2))))
                    continue
                ctype, fname = decl.split()
                fields.append((fname, _CTYPES[ctype]))
            self.structs[m.group(1)] = type(m.group(1), (ctypes.Structure,), {"_fields_": fields})

        # The maps' shapes as the BPF build declares them: name -> (key, value, max_entries)
        # in bytes and entries, compared with what a pinned datapath really has.
        self.maps: dict[str, tuple[int, int, int]] = {}
        sizes: dict[str, int] = {"__u32": 4, "__u64": 8, "int": 4}
        for name, st in self.structs.items():
            sizes[f"struct {name}"] = ctypes.sizeof(st)
        for m in re.finditer(
            r"BPF_TABLE\(\s*\"\w+\"\s*,\s*([\w ]+?)\s*,\s*([\w ]+?)\s*,\s*(\w+)\s*,"
            r"\s*(\w+)\s*\)",
            text,
        ):
            key, value, name, entries = m.groups()
            self.maps[name] = (sizes[key], sizes[value], self._value(entries))
        for m in re.finditer(r"BPF_DEVMAP\(\s*(\w+)\s*,\s*(\w+)\s*\)", text):
            self.maps[m.group(1)] = (4, 4, self._value(m.group(2)))  # bcc: int -> int
        for m in re.finditer(r"BPF_RINGBUF_OUTPUT\(\s*(\w+)\s*,\s*(\w+)\s*\)", text):
            # a ring buffer: no key or value, max_entries is its size in bytes (pages)
            self.maps[m.group(1)] = (0, 0, self._value(m.group(2)) * mmap.PAGESIZE)

    def _value(self, token: str) -> int:
        return int(token) if token.isdigit() else self.consts[token]

    def names(self, prefix: str) -> tuple[str, ...]:
        """Lower-case names of an enum-like family, by value: names("FO_DROP_") ->
        ("no_lower", "inactive_rx").  Counts (FO_N*) do not share the prefix."""
        family = {
            k[len(prefix) :].lower(): v for k, v in self.consts.items() if k.startswith(prefix)
        }
        return tuple(sorted(family, key=family.__getitem__))

    @property
    def drop_reasons(self) -> tuple[str, ...]:
        return self.names("FO_DROP_")

    @property
    def hooks(self) -> tuple[str, ...]:
        return self.names("FO_HOOK_")

    def __getattr__(self, name: str) -> int:
        try:
            return self.consts[name]
        except KeyError:
            raise AttributeError(name) from None

    def index(self, macro: str, *args: int) -> int:
        """FO_*_IDX(args); on the switch path, so each macro is compiled once."""
        fn = self._compiled.get(macro)
        if fn is None:
            fn = self._compiled[macro] = self._compile(macro)
        return fn(*args)

    def _compile(self, macro: str) -> Callable[..., int]:
        params, body = self._macros[macro]
        _eval(body, {**self.consts, **dict.fromkeys(params, 1)})  # validate: arithmetic only
        code = compile(ast.parse(body.strip(), mode="eval"), f"<{macro}>", "eval")
        consts = dict(self.consts)

        def index(*args: int) -> int:
            return int(
                eval(code, {"__builtins__": {}}, {**consts, **dict(zip(params, args, strict=True))})
            )

        return index


@cache
def load() -> Layout:
    return Layout((bpf_dir() / "failover.h").read_text())


def _slot_names() -> dict[int, str]:
    """Slot number -> role name of the lower slots (FO_SLOT_* of failover.h, without NONE)."""
    L = load()
    return {L.consts[f"FO_SLOT_{n.upper()}"]: n for n in L.names("FO_SLOT_") if n != "none"}


SLOT_NAMES: dict[int, str] = _slot_names()
ROLE_SLOTS: dict[str, int] = {name: slot for slot, name in SLOT_NAMES.items()}
