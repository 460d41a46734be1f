"""The explanation document's JSON Schema and its validator.

``langmamba/resources/explanation.schema.json`` (draft 2020-12) describes the document
:func:`langmamba.explain.explain_volume` returns and :func:`langmamba.explain.write_explanation` streams;
:func:`validate_explanation` checks a document against it with langmamba's own validator for the keyword subset the
schema uses, so no ``jsonschema`` dependency is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langmamba.errors import ConfigError, InputError

SCHEMA_NAME = "langmamba-explanations"
SCHEMA_VERSION = "2.0"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "resources" / "explanation.schema.json"

_ANNOTATIONS = {"$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples"}
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def load_schema() -> dict[str, Any]:
    """The explanation document's JSON Schema (draft 2020-12) shipped with langmamba."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


class _Validator:
    """The subset of JSON Schema 2020-12 the explanation schema uses: ``$ref`` to ``#/$defs/...``,
    ``type``, ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties``, ``items``,
    ``minItems``, ``maxItems``, ``minimum``, ``maximum``, ``minLength``. Other keywords raise
    :class:`ConfigError`, so a schema edit cannot silently go unchecked."""

    keywords = {
        "$ref",
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "minLength",
    }

    def __init__(self, schema: dict[str, Any], limit: int = 20) -> None:
        self.root = schema
        self.limit = limit
        self.errors: list[str] = []

    def check(self, value: Any, schema: dict[str, Any] | bool, where: str) -> None:
        if len(self.errors) >= self.limit:
            return
        if schema is True:
            return
        if schema is False:
            self._fail(where, "no value is allowed here")
            return
        unknown = set(schema) - self.keywords - _ANNOTATIONS
        if unknown:
            raise ConfigError(f"the explanation schema uses keywords the validator does not support: {sorted(unknown)}")
        if "$ref" in schema:
            self.check(value, self._resolve(schema["$ref"]), where)
        if "type" in schema:
            types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
            if not any(_TYPES[t](value) for t in types):
                self._fail(where, f"expected {' or '.join(types)}, got {type(value).__name__}")
                return
        if isinstance(value, float) and not math.isfinite(value):
            self._fail(where, f"{value} is not a finite number")
        if "enum" in schema and value not in schema["enum"]:
            self._fail(where, f"{value!r} is not one of {schema['enum']}")
        if "const" in schema and value != schema["const"]:
            self._fail(where, f"expected {schema['const']!r}, got {value!r}")
        if _TYPES["number"](value):
            if "minimum" in schema and value < schema["minimum"]:
                self._fail(where, f"{value} is below the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                self._fail(where, f"{value} is above the maximum {schema['maximum']}")
        if isinstance(value, str) and len(value) < schema.get("minLength", 0):
            self._fail(where, f"string shorter than {schema['minLength']}")
        if isinstance(value, dict):
            self._object(value, schema, where)
        if isinstance(value, list):
            if len(value) < schema.get("minItems", 0):
                self._fail(where, f"{len(value)} items, fewer than {schema['minItems']}")
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                self._fail(where, f"{len(value)} items, more than {schema['maxItems']}")
            if "items" in schema:
                for i, item in enumerate(value):
                    self.check(item, schema["items"], f"{where}/{i}")

    def _fail(self, where: str, message: str) -> None:
        self.errors.append(f"{where or '(document)'}: {message}")

    def _object(self, value: dict[str, Any], schema: dict[str, Any], where: str) -> None:
        for key in schema.get("required", []):
            if key not in value:
                self._fail(where, f"missing required key {key!r}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                self.check(item, properties[key], f"{where}/{key}")
            elif extra is False:
                self._fail(where, f"unexpected key {key!r}")
            else:
                self.check(item, extra, f"{where}/{key}")

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            raise ConfigError(f"the explanation schema refers outside itself ({ref}); only '#/...' is supported")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part]
        resolved: dict[str, Any] = node
        return resolved


def validate_explanation(document: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Check ``document`` against the explanation schema (default: the shipped one).

    Uses langmamba's own validator for the schema's keyword subset (see :class:`_Validator`), so no
    ``jsonschema`` dependency is needed. Also checks what the schema cannot say: every slice lists the
    document's levels in order, and each region list has the level's ``g_h × g_w`` entries.

    Raises:
        InputError: the document does not match; the message lists up to 5 problems with their JSON paths.
    """
    schema = load_schema() if schema is None else schema
    validator = _Validator(schema)
    validator.check(document, schema, "")
    errors = validator.errors
    if not errors:
        grids = {entry["level"]: entry["grid"] for entry in document["levels"]}
        order = [entry["level"] for entry in document["levels"]]
        for i, entry in enumerate(document["slices"]):
            present = [level_entry["level"] for level_entry in entry["levels"]]
            if present != order:
                errors.append(f"/slices/{i}: levels {present} differ from the document's {order}")
                continue
            for j, level_entry in enumerate(entry["levels"]):
                grid = grids[level_entry["level"]]
                if len(level_entry["regions"]) != grid[0] * grid[1]:
                    errors.append(f"/slices/{i}/levels/{j}: {len(level_entry['regions'])} regions for a grid {grid}")
    if errors:
        shown = "; ".join(errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InputError(f"the explanation document does not match {SCHEMA_NAME} {SCHEMA_VERSION}: {shown}{more}")
