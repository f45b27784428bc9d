"""The Python side's layouts (datapath/layout_gen.py) are bpf/failover.h's: the committed
module is what the generator writes from the header, and what it says is what the header
says (pure, no root)."""

from __future__ import annotations

import ctypes
import itertools
import subprocess
import sys
from pathlib import Path

from bpfailover.datapath import layout, layout_gen


def test_generated_module_is_current() -> None:
    """Regenerate it when failover.h changes:
    python -m bpfailover.datapath.layout --generate > control/bpfailover/datapath/layout_gen.py
    """
    p = subprocess.run(
        [sys.executable, "-m", "bpfailover.datapath.layout", "--generate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    committed = Path(layout_gen.__file__).read_text()
    assert p.stdout == committed, "datapath/layout_gen.py is stale: regenerate it"


def test_generated_module_says_what_the_header_says() -> None:
    """Every FO_* integer constant with its value, every index macro giving what the macro
    computes, every struct member in order and size, every map's shape."""
    lay = layout.load()
    consts = {
        k: v for k, v in vars(layout_gen).items() if k.startswith("FO_") and isinstance(v, int)
    }
    assert consts == lay.consts
    assert set(lay.macros) == {"FO_LOWER_IDX", "FO_STATS_IDX", "FO_DROPS_IDX"}
    for name, (params, body) in lay.macros.items():
        fn = getattr(layout_gen, name)
        for args in itertools.product((0, 1, 2, 63), repeat=len(params)):
            want = layout._eval(body, {**lay.consts, **dict(zip(params, args, strict=True))})
            assert fn(*args) == want, (name, args)
    for sname, parsed in lay.structs.items():
        gen = getattr(layout_gen, sname)
        assert gen._fields_ == parsed._fields_, sname
        assert ctypes.sizeof(gen) == ctypes.sizeof(parsed), sname
    assert (ctypes.sizeof(layout_gen.fo_dev), ctypes.sizeof(layout_gen.fo_group)) == (8, 44)
    assert set(layout_gen.MAP_SHAPES) == set(lay.maps)
    for prefix, names in layout_gen.NAMES.items():
        assert layout_gen.names(prefix) == lay.names(prefix) == names
    assert set(layout_gen.NAMES) >= {"FO_SLOT_", "FO_DIR_", "FO_DROP_", "FO_HOOK_", "FO_DPC_"}
    assert layout_gen.names("FO_IRX_") == ("deliver", "drop_standby", "drop_inactive")
