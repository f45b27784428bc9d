"""YAML in, a validated `Config` out: the loader (no anchors, aliases or duplicate keys),
pydantic's errors rewritten to one line per key with a hint or a near-miss suggestion,
and what only this machine can check."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bpfailover.model.config.schema import (
    STANDBY_TAGS,
    Config,
    ConfigError,
    Loc,
    LocatedError,
    model_in,
)

# --- YAML ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and has no YAML 1.1 base-60 numbers, so an
    unquoted MAC like 52:54:00:00:12:53 stays a string instead of becoming an integer.

    It also refuses anchors and aliases: a config never needs them, and a few hundred
    bytes of nested aliases expand to millions of values (an "alias bomb") that would take
    minutes to validate, inside the agent's loop on SIGHUP.  Refused as the parser meets
    the first one, before anything is built."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        ev = self.peek_event()
        if isinstance(ev, yaml.AliasEvent):
            what = f"alias *{ev.anchor}"
        elif isinstance(ev, yaml.NodeEvent) and ev.anchor is not None:
            what = f"anchor &{ev.anchor}"
        else:
            return super().compose_node(parent, index)
        msg = f"{what}: anchors and aliases are not allowed (write the value out)"
        raise yaml.composer.ComposerError(None, None, msg, ev.start_mark)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]+|[1-9][0-9_]*|0)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, f"{where}YAML error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"YAML error: {e}") from None
    except RecursionError:
        raise ConfigError(source, "YAML error: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:
        # PyYAML's constructors raise these for values like `0b_` or a date 2001-13-45.
        raise ConfigError(source, f"YAML error: bad value: {e}") from None


# --- pydantic errors -> one line ---------------------------------------------------------------

_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _hint(loc: Loc, kind: str, value: Any) -> str:
    """YAML's traps, said where they bite: an unquoted yes/no/on/off is a boolean, a bare
    port a number."""
    if isinstance(value, bool) and kind in ("string_type", "literal_error"):
        return ": YAML reads an unquoted yes/no/on/off/true/false as a boolean; quote it"
    if loc[-1:] == ("listen",) and isinstance(value, int) and not isinstance(value, bool):
        return f': give host:port, e.g. "0.0.0.0:{value}"'
    return ""


def _describe(err: Any) -> tuple[Loc, str]:
    loc, message = _describe_plain(err)
    return loc, message + _hint(loc, err["type"], err.get("input"))


def _describe_plain(err: Any) -> tuple[Loc, str]:
    kind = err["type"]
    loc: Loc = tuple(p for p in err["loc"] if p not in STANDBY_TAGS)
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return loc, "unknown key"
    if kind == "invalid_key":
        return loc[:-1], f"keys must be strings (got {_got(loc[-1] if loc else err['input'])})"
    if kind == "missing":
        return loc, "required key missing"
    if kind in _TYPE_NAMES:
        return loc, f"must be {_TYPE_NAMES[kind]} (got {_got(err['input'])})"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return loc, f"must be one of {choices} (got {_got(err['input'])})"
    if kind == "too_short" and loc == ("groups",):
        return loc, "at least one group is needed"
    if kind == "too_long":
        return loc, f"at most {ctx.get('max_length')} entries (got {ctx.get('actual_length')})"
    if kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, LocatedError):
            return loc + cause.path, str(cause)
        return loc, str(cause) if cause is not None else err["msg"]
    if kind == "string_pattern_mismatch":
        return loc, f"must match {ctx.get('pattern')} (got {_got(err['input'])})"
    msg: str = err["msg"]
    return loc, msg[:1].lower() + msg[1:]


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model whose keys are valid at `loc` (a path of keys and list indexes)."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        sub = model_in(field.annotation) if field is not None else None
        if sub is None:
            return None
        model = sub
    return model


def _suggest(loc: Loc) -> str | None:
    """The known key an unknown key at `loc` is probably a misspelling of."""
    model = _model_at(loc[:-1]) if loc and isinstance(loc[-1], str) else None
    if model is None:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _from_validation_error(e: ValidationError, source: str) -> ConfigError:
    problems: list[tuple[Loc, str]] = []
    suggested: set[Loc] = set()
    for err in e.errors():
        loc, message = _describe(err)
        if err["type"] == "extra_forbidden":
            near = _suggest(loc)
            if near is not None:
                message += f" (did you mean {near!r}?)"
                suggested.add(loc[:-1] + (near,))
        if (loc, message) not in problems:
            problems.append((loc, message))
    # A misspelt required key also reports the real one missing: the suggestion says it.
    problems = [
        (loc, msg) for loc, msg in problems if not (loc in suggested and msg.startswith("required"))
    ] or problems
    (path, message), *more = problems
    return ConfigError(source, message, path, more)


# --- entry points ------------------------------------------------------------------------------


def parse_config(text: str, source: str = "<config>") -> Config:
    data = _load_yaml(text, source)
    if data is None:
        raise ConfigError(source, "empty config: at least 'groups' is needed")
    if not isinstance(data, dict):
        raise ConfigError(source, f"top level must be a mapping (got {type(data).__name__})")
    return validate_config(data, source)


def validate_config(data: Any, source: str = "<config>") -> Config:
    """Validate already-parsed data (a dict as YAML gives it)."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e, source) from None
    except RecursionError:
        raise ConfigError(source, "nested too deeply") from None


def load_config(path: str | Path) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, f"not UTF-8 text (byte {e.start})") from None
    except PermissionError as e:
        raise ConfigError(
            source, f"cannot read: {e.strerror or e} (run as root, or make it readable)"
        ) from None
    except OSError as e:
        raise ConfigError(source, f"cannot read: {e.strerror or e}") from None
    return parse_config(text, source)


def check_host(cfg: Config, source: str = "<config>") -> None:
    """What only this machine can say about a valid config: the unix groups it names
    exist.  failoverd runs it before creating anything (failoverctl, reading the socket
    path from the same file, does not)."""
    import grp

    for key in ("group", "admin_group"):
        name = getattr(cfg.control, key)
        if name is None:
            continue
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ConfigError(source, f"no such group {name!r}", ("control", key)) from None
