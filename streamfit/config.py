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

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from modelstore.errors import ConfigError

ENV_PREFIX = "STREAMFIT_"
CONFIG_SECTIONS = ("worker", "predictor")


def merge_settings(
    section: str,
    defaults: Mapping[str, Any],
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Merge the three layers for the settings of one command.

    ``defaults`` maps each setting to its default, which gives the type an
    environment value is converted to. ``flags`` holds the parsed flags,
    None for a flag not given.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}

    if config_file:
        merged.update(_read_toml_section(config_file, section))

    for key, default in defaults.items():
        name = ENV_PREFIX + key.upper()
        if name in environ:
            merged[key] = _from_env(name, environ[name], default)

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

    unknown = sorted(set(data) - set(CONFIG_SECTIONS))
    if unknown:
        raise ConfigError(
            f"config file {path!r}: unknown tables or keys {unknown}; settings go in "
            f"the tables {', '.join(f'[{s}]' for s in CONFIG_SECTIONS)}"
        )
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"config file {path!r}: [{section}] must be a table of settings, got {table!r}"
        )
    return dict(table)


def _from_env(name: str, value: str, default: Any) -> Any:
    """Convert one variable's text to the type of the setting's default.

    ``default`` may also be the type itself, for a setting whose default is
    None. Settings whose default is None or a string stay strings, and the
    settings class validates them.
    """
    if default is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value[:80]!r} is invalid: expected a whole number") from None
    try:
        if isinstance(default, bool):
            return _parse_bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, dict):
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError(value)
            return parsed
    except ValueError:
        expected = "a JSON object" if isinstance(default, dict) else type(default).__name__
        raise ConfigError(
            f"{name}={value[:80]!r} is invalid: expected {expected}, like the default {default!r}"
        ) from None
    return value


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)
