"""Agent configuration (docs/operators.md): YAML in, validated immutable models out.

Every key is checked and unknown keys are refused; any problem becomes one `ConfigError`
whose text is a single line naming the source and the path of the offending key, e.g.
`config.yaml: groups[0].policy.reselect: must be one of always, better, failure (got 'x')`.

By job: `schema` (the models), `load` (YAML, errors, host checks), `diff` (what a reload
changes), `doc` (docs/config.md and `python -m bpfailover.model.config`). Import this
package, not its modules: it is the interface the rest of the code base uses.
"""

from __future__ import annotations

from bpfailover.model.config.diff import LIVE_KEYS, changes, fixed_changes, live_changes
from bpfailover.model.config.doc import reference
from bpfailover.model.config.load import check_host, load_config, parse_config, validate_config
from bpfailover.model.config.schema import (
    IFNAMSIZ,
    MAX_GROUPS,
    PEER_PREFIX_BYTES,
    REFERENCE,
    Config,
    ConfigError,
    ControlSettings,
    Group,
    Loc,
    LogSettings,
    MetricsSettings,
    NotifySettings,
    PolicySettings,
    SchedulingSettings,
    StandbyDriver,
    format_path,
    peer_name,
)
from bpfailover.model.paths import CONFIG_ENV, DEFAULT_CONFIG_PATH, config_path

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "IFNAMSIZ",
    "LIVE_KEYS",
    "MAX_GROUPS",
    "PEER_PREFIX_BYTES",
    "REFERENCE",
    "Config",
    "ConfigError",
    "ControlSettings",
    "Group",
    "Loc",
    "LogSettings",
    "MetricsSettings",
    "NotifySettings",
    "PolicySettings",
    "SchedulingSettings",
    "StandbyDriver",
    "changes",
    "check_host",
    "config_path",
    "fixed_changes",
    "format_path",
    "live_changes",
    "load_config",
    "parse_config",
    "peer_name",
    "reference",
    "validate_config",
]
