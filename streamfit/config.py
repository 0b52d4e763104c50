"""Settings from command-line flags, then STREAMFIT_* variables, then a TOML file.

A flag given on the command line wins over the environment, which wins over
the file. The TOML file has one table per command (``[worker]``,
``[predictor]``); its keys are the flag names with '_' in place of '-'.
The settings classes of the worker and predictor validate the merged
mapping and reject unknown keys.

Secrets never pass through flags: they come from the environment or files
(for example ``STREAMFIT_COUCHBASE_PASSWORD_FILE``), so they do not show up
in process listings or shell history.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from modelstore.errors import ConfigError

ENV_PREFIX = "STREAMFIT_"


def merge_settings(
    section: str,
    keys: Iterable[str],
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Merge the three layers for the settings ``keys`` of one command.

    ``flags`` holds the parsed flags, None for a flag not given. Environment
    values are strings; the settings class converts and validates them.
    """
    environ = os.environ if environ is None else environ
    keys = list(keys)
    merged: dict[str, Any] = {}

    if config_file:
        merged.update(_read_toml_section(config_file, section))

    for key in keys:
        value = environ.get(ENV_PREFIX + key.upper())
        if value is not None:
            merged[key] = value

    for key, value in flags.items():
        if value is not None:
            merged[key] = value
    return merged


def _read_toml_section(path: str, section: str) -> dict[str, Any]:
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found; check the --config path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None

    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"config file {path!r}: [{section}] must be a table of settings, got {table!r}"
        )
    return dict(table)


def coerce_strings(defaults: Mapping[str, Any], merged: Mapping[str, Any]) -> dict[str, Any]:
    """Convert string values (from the environment) to the type of each setting's default.

    Settings whose default is None or a string stay strings; the settings
    class validates them.
    """
    out = dict(merged)
    for key, value in merged.items():
        if not isinstance(value, str) or key not in defaults:
            continue
        default = defaults[key]
        try:
            if isinstance(default, bool):
                out[key] = _parse_bool(key, value)
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
        except ValueError:
            raise ConfigError(
                f"{ENV_PREFIX}{key.upper()}={value!r} is invalid: expected "
                f"{type(default).__name__}, like the default {default!r}"
            ) from None
    return out


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)
