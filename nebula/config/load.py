"""Load YAML/JSON config files into pydantic models with errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config could not be read or failed validation; the message names each bad field."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


def format_validation_error(err: ValidationError, source: str = "config") -> ConfigError:
    lines = []
    errors = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
        errors.append({"field": field, "message": e["msg"], "type": e["type"]})
    return ConfigError(f"invalid {source}:\n" + "\n".join(lines), errors)


def parse_text(text: str, fmt: str | None = None) -> Any:
    """Parse YAML or JSON text (JSON is YAML, but JSON errors read better from json)."""
    if fmt == "json" or (fmt is None and text.lstrip().startswith("{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}") from e


def load_model(model: type[M], data: Any, source: str = "config") -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, source) from None


def load_file(model: type[M], path: str | Path) -> M:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    fmt = "json" if p.suffix == ".json" else None
    return load_model(model, parse_text(p.read_text(), fmt), source=str(p))


def load_file_or_exit(model: type[M], path: str | Path) -> M:
    """For entry points: the config, or the error (naming each field) on stderr and exit 2."""
    import sys

    try:
        return load_file(model, path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
