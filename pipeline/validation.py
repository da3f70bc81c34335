"""One-line error descriptions for the YAML files users write (run configs, streams, search spaces)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def read_yaml_mapping(path: Path, kind: str, expected: str, error: type[Exception], empty_ok: bool = False) -> dict[str, Any]:
    """The mapping in the YAML file `path` (a `kind`, e.g. "config file"), or `error` naming the file
    and what is wrong: missing, not UTF-8, not YAML, or not the `expected` mapping."""
    if not path.is_file():
        raise error(f"{path}: {kind} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as problem:
        raise error(f"{path}: not a valid YAML file ({yaml_problem(problem)})") from problem
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not a valid YAML file (not UTF-8 text)") from problem
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}")
    return data


def validation_problems(error: ValidationError) -> str:
    """Pydantic's errors on one line: `field.path: message; ...`."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
    )


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: where, then what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
