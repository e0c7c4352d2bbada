"""Where each setting of `waystation server run` comes from: a flag, an environment
variable, the `--config` file, or the default (in that order of precedence).

The file is TOML with one key per flag of `server run`, named as the flag without
its dashes (`data-dir = "/var/lib/waystation"`, `fsync = false`, `db-wait = "2m"`);
`--config` itself has no key. Unknown keys and values of the wrong TOML type are
refused, naming the key. Relative paths in the file are relative to the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

# Parameters of the commands that are not settings of the server.
NOT_SETTINGS = frozenset({"config", "json_output"})
# Settings that are durations: a Go duration string ("90s", "1h5m") or a number of seconds.
DURATIONS = frozenset(
    {"ack_timeout", "heartbeat_timeout", "poll_interval", "hang_timeout", "db_wait"}
    | {"audit_retention", "token_ttl"}
)
PATHS = frozenset({"data_dir", "tls_cert", "tls_key"})

SOURCES = ("flag", "environment", "file", "default")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the setting."""


@dataclass
class Setting:
    name: str  # the parameter's: data_dir
    key: str  # the file's and `server config`'s: data-dir
    flag: str  # --data-dir
    envvar: str | None
    kind: str  # "str", "bool", "path" or "duration"
    value: Any  # as given (flag or environment text, the file's value), else the default
    source: str  # one of SOURCES
    file: Path | None = None

    @property
    def where(self) -> str:
        """How the setting was given, for error messages."""
        if self.source == "environment" and self.envvar:
            return self.envvar
        if self.source == "file":
            return f"{self.key} in {self.file}"
        return self.flag


def resolve(ctx: typer.Context, config: Path | None) -> dict[str, Setting]:
    """Every setting of the command, by parameter name, with its value and source."""
    settings: dict[str, Setting] = {}
    for param in ctx.command.params:
        name = param.name
        if name is None or name in NOT_SETTINGS or not param.opts:
            continue
        flag = param.opts[0]
        envvar = param.envvar if isinstance(param.envvar, str) else None
        kind = (
            "bool"
            if getattr(param, "is_flag", False)
            else "duration"
            if name in DURATIONS
            else "path"
            if name in PATHS
            else "str"
        )
        settings[name] = Setting(name, flag.lstrip("-"), flag, envvar, kind, ctx.params[name], "")
    from_file = load(config, list(settings.values())) if config is not None else {}
    for name, setting in settings.items():
        given = ctx.get_parameter_source(name)
        origin = given.name if given is not None else "DEFAULT"
        if origin == "COMMANDLINE":
            setting.source = "flag"
        elif origin == "ENVIRONMENT":
            setting.source = "environment"
        elif name in from_file:
            setting.source, setting.value, setting.file = "file", from_file[name], config
        else:
            setting.source = "default"
    return settings


_TOML_TYPES = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}


def load(path: Path, settings: list[Setting]) -> dict[str, Any]:
    """The file's values by parameter name, type-checked (ConfigError names the key)."""
    try:
        with path.open("rb") as source:
            data = tomllib.load(source)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    by_key = {s.key: s for s in settings}
    values: dict[str, Any] = {}
    for key, value in data.items():
        setting = by_key.get(key)
        if setting is None:
            dashed = key.replace("_", "-")
            hint = f" (did you mean {dashed!r}?)" if dashed in by_key else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        expected = _expected(setting.kind, value)
        if expected:
            given = _TOML_TYPES.get(type(value), "a table or an array")
            raise ConfigError(f"{path}: key {key!r} must be {expected}, not {given}")
        if setting.kind == "path":
            value = path.parent / Path(value).expanduser()
        values[setting.name] = value
    return values


def _expected(kind: str, value: Any) -> str:
    """What `value` should have been, or "" when it is of the right type."""
    if kind == "bool":
        return "" if isinstance(value, bool) else "a boolean (true or false)"
    if kind == "duration":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return "" if number or isinstance(value, str) else 'a duration ("90s") or seconds'
    return "" if isinstance(value, str) else "a string"


def shown(value: Any) -> Any:
    """A value as `server config` prints it (JSON-able)."""
    if isinstance(value, Path):
        return str(value)
    return None if value == "" else value
