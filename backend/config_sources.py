"""How every settings group is read (environment, then `.env.backend`) and how its errors are worded."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ENV_FILE = ".env.backend"
_SECRET_FIELDS = {"api_key", "token"}


def settings_config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=DEFAULT_ENV_FILE,
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        # Field names work too (Settings.load overrides), also for fields with an alias such as RERANKER_BATCH_SIZE.
        populate_by_name=True,
    )


def describe_validation_error(exc: ValidationError, group: type[BaseSettings]) -> list[str]:
    """One line per problem: the environment variable, the value received and what is allowed."""
    prefix = str(group.model_config.get("env_prefix", ""))
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
        field = loc[0] if loc else ""
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if not field and ":" in message:  # model validators name their field at the start of the message
            field, message = (part.strip() for part in message.split(":", 1))
        variable = _variable_name(group, field, prefix)
        received = error.get("input")
        shown = "<secret>" if field.lower() in _SECRET_FIELDS else repr(received)
        if isinstance(received, dict):  # the whole model was the input: the message says what is wrong
            lines.append(f"{variable}: {message}")
        else:
            lines.append(f"{variable}={shown}: {message}")
    return lines


def _variable_name(group: type[BaseSettings], field: str, prefix: str) -> str:
    """The environment variable(s) behind `field`, which is a field name or one of its aliases."""
    if not field:
        return prefix.rstrip("_")
    for name, info in group.model_fields.items():
        aliases = getattr(info.validation_alias, "choices", None) or []
        names = [str(alias).upper() for alias in aliases]
        if name == field or field.upper() in names:
            return " / ".join(names) if names else f"{prefix}{name.upper()}"
    return f"{prefix}{field.upper()}"
