"""docs/config.md, generated from the models: every key with its type, default and
meaning; and `python -m bpfailover.model.config` (--reference, --check FILE)."""

from __future__ import annotations

import sys
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from bpfailover.model.config.load import load_config
from bpfailover.model.config.schema import Config, ConfigError, model_in
from bpfailover.model.paths import CONFIG_ENV, DEFAULT_CONFIG_PATH


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin is list:
        return f"list of {_type_name(get_args(annotation)[0])}s"
    if origin in (Union, UnionType):
        names = [_type_name(a) for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(dict.fromkeys(names))
        return text + (" or null" if type(None) in get_args(annotation) else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {str: "string", int: "integer", bool: "boolean"}.get(annotation, str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "see below"
    return "`null`" if value is None else f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, field in model.model_fields.items():
        path = f"{prefix}{key}"
        sub = model_in(field.annotation)
        is_list = get_origin(field.annotation) is list or (
            get_origin(field.annotation) is Annotated
            and get_origin(get_args(field.annotation)[0]) is list
        )
        meaning = " ".join((field.description or "").split())
        rows.append((path, _type_name(field.annotation), _default(field), meaning))
        if sub is not None:
            rows.extend(_rows(sub, path + ("[]." if is_list else ".")))
    return rows


def reference() -> str:
    """docs/config.md: every key with its type, default and meaning, from the models."""
    out = [
        "# failoverd configuration reference",
        "",
        "<!-- Generated from control/bpfailover/model/config/schema.py by",
        "     `python -m bpfailover.model.config --reference > docs/config.md`; do not edit. -->",
        "",
        f"failoverd reads YAML from `--config`, else `${CONFIG_ENV}`, else "
        f"`{DEFAULT_CONFIG_PATH}`. Unknown keys are refused (with a suggestion for a "
        'near miss), values are strictly typed (`"5"` is not an integer, `yes` is not a '
        "string), and every problem is reported at once, one line each, naming its key.",
        "",
        "A minimal config:",
        "",
        "```yaml",
        "groups:",
        "  - name: ens10",
        "    standby: ens10nsby",
        "```",
        "",
        "| key | type | default | meaning |",
        "|-----|------|---------|---------|",
    ]
    for path, kind, default, meaning in _rows(Config, ""):
        cells = (f"`{path}`", kind, default, meaning.replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m bpfailover.model.config", description="failoverd's config"
    )
    ap.add_argument("--reference", action="store_true", help="print docs/config.md")
    ap.add_argument("--check", metavar="FILE", help="validate FILE; exit 2 if it is bad")
    args = ap.parse_args(argv)
    if args.check:
        try:
            load_config(args.check)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{args.check}: ok")
        return 0
    print(reference(), end="")
    return 0
