"""Options a gateway or settlement command repeats, from the environment or
a TOML file instead of the command line (docs/CLI.md, Configuration).

Precedence, highest first: the option on the command line, then the
environment variable (`QRPAY_GATEWAY_DIR` for `--gateway-dir`), then the
config file (`--config FILE`, else `QRPAY_CONFIG`), then the built-in
default. In the file, top-level keys apply to every command that takes the
option, and a table named after a command (`[close]`, `["scale settle"]`)
applies to that command only, over the top level:

    gateway-dir = "/var/lib/qrpay/gateway"
    gateway-key = "/etc/qrpay/gateway.key"
    issuer-public = ["/etc/qrpay/issuer.pub"]

    ["scale settle"]
    workers = 4
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:   # pragma: no cover - Python 3.10
    import tomli as tomllib

# The options that may come from the environment or the config file: where
# the gateway, the store and the keys are, which every command repeats.
CONFIGURABLE = ("gateway-dir", "gateway-key", "issuer-public", "issuer-key", "settlement-dir",
                "archive", "settlement-key", "settlement-public", "root-public", "server",
                "scheduler", "workers", "log-level")
CONFIG_ENV = "QRPAY_CONFIG"


class ConfigError(Exception):
    """A config file or variable that cannot be used (exit 2)."""


def env_name(option: str) -> str:
    return "QRPAY_" + option.upper().replace("-", "_")


def config_path(argv: Sequence[str]) -> str | None:
    """--config from the command line (read before parsing: it decides what
    the parse may leave out), else QRPAY_CONFIG."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.environ.get(CONFIG_ENV) or None


def load(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not TOML: {exc}") from None
    _check_keys(path, data, top=True)
    return data


def _check_keys(path: str, table: Mapping[str, Any], top: bool) -> None:
    for key, value in table.items():
        if top and isinstance(value, dict):
            _check_keys(path, value, top=False)
        elif key not in CONFIGURABLE:
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: "
                              f"{', '.join(CONFIGURABLE)}; command tables like [close])")


def mark(parser: argparse.ArgumentParser, command: str) -> None:
    """Let a leaf parser's configurable options be left out on the command
    line (the fill below checks them), and say where else they come from."""
    parser.set_defaults(_command=command)
    required: list[str] = []
    fallbacks: dict[str, Any] = {}
    for action in parser._actions:
        option = _long_option(action)
        if option is None:
            continue
        # Left out on the command line, the option reads None: then the
        # environment and the file are asked before the built-in default.
        if action.default is not None:
            fallbacks[action.dest] = action.default
            action.default = None
        where = f"env {env_name(option)} or `{option}` in the config file"
        if action.required:
            action.required = False
            required.append(action.dest)
            where = f"required: here, or {where}"
        action.help = f"{action.help} [{where}]" if action.help else f"[{where}]"
    parser.set_defaults(_required_from_config=tuple(required), _fallbacks=fallbacks)


def _long_option(action: argparse.Action) -> str | None:
    for string in action.option_strings:
        if string.startswith("--") and string[2:] in CONFIGURABLE:
            return string[2:]
    return None


def fill(leaf: argparse.ArgumentParser, args: argparse.Namespace,
         config: Mapping[str, Any]) -> None:
    """Each configurable option the command line left out, from the
    environment, else the file; a required one found nowhere is a usage
    error naming all three places."""
    command = getattr(args, "_command", "")
    table = config.get(command, {}) if isinstance(config.get(command), dict) else {}
    for action in leaf._actions:
        option = _long_option(action)
        if option is None or getattr(args, action.dest, None) not in (None, []):
            continue
        raw = os.environ.get(env_name(option))
        source = f"${env_name(option)}"
        if raw is None or raw == "":
            raw = table.get(option, config.get(option))
            source = f"`{option}` in the config file"
        if raw is None:
            fallback = getattr(args, "_fallbacks", {}).get(action.dest)
            if fallback is not None:
                setattr(args, action.dest, fallback)
                continue
            if action.dest in getattr(args, "_required_from_config", ()):
                leaf.error(f"the following arguments are required: --{option} (or set "
                             f"{env_name(option)}, or `{option}` in the config file)")
            continue
        setattr(args, action.dest, _converted(leaf, action, raw, source))


def _converted(leaf: argparse.ArgumentParser, action: argparse.Action, raw: Any,
               source: str) -> Any:
    """The value as the command line would have given it: the option's type
    applied to each string; a repeatable option takes a list (a TOML array,
    or a comma-separated variable)."""
    repeatable = isinstance(action, argparse._AppendAction)
    if repeatable:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list):
            leaf.error(f"{source}: a list of strings")
        return [_one(leaf, action, item, source) for item in items if str(item).strip()]
    return _one(leaf, action, raw, source)


def _one(leaf: argparse.ArgumentParser, action: argparse.Action, raw: Any,
         source: str) -> Any:
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        leaf.error(f"{source}: a string or a whole number, not {type(raw).__name__}")
    text = str(raw).strip()
    if action.choices is not None and text not in action.choices:
        leaf.error(f"{source}: {text!r} is not one of {', '.join(map(str, action.choices))}")
    if action.type is None:
        return text
    try:
        return action.type(text)   # type: ignore[operator]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        leaf.error(f"{source}: {exc}")
