"""Validation of model names, which become parts of store keys and URLs."""

import re

from modelstore.errors import InvalidInputError, InvalidModelName

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_model_name(name: object) -> str:
    """Return ``name`` unchanged if it is a valid model name, else raise InvalidModelName.

    A name has 1 to 128 characters: ASCII letters, digits, '.', '_' and '-',
    starting with a letter or digit. Path separators, ':' (the store's key
    separator), whitespace and control characters are never allowed.
    """
    if not isinstance(name, str):
        raise InvalidModelName(
            f"invalid model name {name!r}: expected a string, got {type(name).__name__}"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(
            f"invalid model name {name[:40]!r}...: {len(name)} characters, "
            f"the maximum is {MAX_NAME_LENGTH}"
        )
    if not _NAME.fullmatch(name):
        raise InvalidModelName(
            f"invalid model name {name!r}: use 1 to {MAX_NAME_LENGTH} ASCII letters, "
            "digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


MAX_ALIAS_LENGTH = 64
# Aliases start with a letter, so an alias can never be read as a version number.
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def validate_alias_name(alias: object) -> str:
    """Return ``alias`` unchanged if it is a valid alias name, else raise InvalidInputError.

    An alias has 1 to 64 characters: ASCII letters, digits, '.', '_' and '-',
    starting with a letter (for example ``production`` or ``candidate``).
    """
    if not isinstance(alias, str) or len(alias) > MAX_ALIAS_LENGTH or not _ALIAS.fullmatch(alias):
        shown = alias[:40] if isinstance(alias, str) else alias
        raise InvalidInputError(
            f"invalid alias name {shown!r}: use 1 to {MAX_ALIAS_LENGTH} ASCII letters, digits, "
            "'.', '_' or '-', starting with a letter (for example 'production')"
        )
    return alias
