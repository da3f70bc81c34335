"""One-line error descriptions for the YAML files users write (run configs, streams, search spaces)."""

from __future__ import annotations

import yaml
from pydantic import ValidationError


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
