"""The config files as written: duplicate keys refused, the schema checked with short messages.

YAML lets a mapping repeat a key (the last one silently wins), so two runs of one name or two
``seed:`` lines would merge unnoticed: :func:`check_duplicate_keys` refuses them. The JSON
schema is checked by :func:`validate_config`, which fills the schema's defaults as
``snakemake.utils.validate`` does but reports a violation as one line: the key's path, the
bad value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from lensspace.errors import LensspaceError


def check_duplicate_keys(path: str | Path) -> None:
    """Refuse a YAML (or JSON) config file in which one mapping holds a key twice."""
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return  # not ours to report: Snakemake's own loader names the syntax error
    for where, key, first, second in _duplicates(root, ""):
        raise LensspaceError(
            f"{path}: key '{key}' appears twice in {where or 'the top level'}, on "
            f"lines {first} and {second}; YAML would keep only the last: keep one"
        )


def _duplicates(node: yaml.Node | None, where: str) -> Iterator[tuple[str, str, int, int]]:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                yield where, key, seen[key], line
            seen[key] = line
            yield from _duplicates(value_node, f"{where}.{key}" if where else key)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicates(item, f"{where}[{i}]")


def _with_defaults(validator_class):
    """The validator class that fills ``default`` values of ``properties`` while it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def validate_config(config: dict[str, Any], schema_path: str | Path) -> None:
    """Check ``config`` against the schema and fill its defaults in place; one clear error."""
    check_finite(config)
    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    error = best_match(_with_defaults(Draft202012Validator)(schema).iter_errors(config))
    if error is not None:
        raise LensspaceError(describe(error))


def check_finite(node: Any, path: tuple = ()) -> None:
    """Refuse NaN and infinity anywhere in the config (YAML's ``.nan``, ``.inf``): a NaN defeats
    every bound of the schema, and would surface as a traceback deep in some job."""
    if isinstance(node, float) and not math.isfinite(node):
        raise LensspaceError(
            f"{key_path(path)}: {node} is not a finite number; numeric settings must be finite"
        )
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_finite(value, (*path, index))


def key_path(parts: Iterable[Any]) -> str:
    """``runs.a.lens.source``, with list positions as ``[i]``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the config"


def describe(error: ValidationError) -> str:
    """One line: where, the bad value, and what is allowed there."""
    where = key_path(error.absolute_path)
    kind, schema, value = error.validator, error.schema, error.instance
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unexpected = ", ".join(repr(k) for k in sorted(set(value) - set(allowed)))
        return f"{where}: unknown key {unexpected}; allowed keys: {', '.join(allowed)}"
    if kind in ("oneOf", "anyOf"):
        allowed = " or ".join(_summary(s) for s in error.validator_value)
        return f"{where}: {value!r} is not allowed; use {allowed}"
    if "propertyNames" in error.absolute_schema_path:
        description = schema.get("description", error.message)
        return f"{where}: the name {value!r} is not allowed; {description}"
    if kind == "pattern" and "description" in schema:
        return f"{where}: {value!r} is not allowed; {schema['description']}"
    return f"{where}: {error.message}"


def _summary(schema: dict[str, Any]) -> str:
    """A few words for one alternative of a ``oneOf``."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type", "value")
    if kind == "array":
        return f"a list, each {_summary(schema.get('items', {}))}"
    if kind == "object":
        return (
            "a mapping of " + ", ".join(schema.get("properties", {}))
            if schema.get("properties")
            else "a mapping"
        )
    bounds = [f">= {schema['minimum']}"] if "minimum" in schema else []
    return " ".join([f"an {kind}" if kind[0] in "aeiou" else f"a {kind}", *bounds])
