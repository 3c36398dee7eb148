"""The subset of Structured Outputs' strict-mode schema rules that clients trip over. PURE.

With ``"strict": true`` the real API rejects (HTTP 400, ``param: "response_format"``) a
schema whose root is not an object, or any object that does not set
``additionalProperties: false`` or does not list every property in ``required``. The
emulator enforces the same rules so a client that passes here also passes there.
"""

from __future__ import annotations

from typing import Any

_NESTED_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_NESTED_MAPS = ("properties", "$defs", "definitions")


def strict_schema_problem(schema: Any) -> str | None:
    """The first strict-mode violation in ``schema`` as OpenAI words it, or ``None``."""
    if not isinstance(schema, dict):
        return "schema must be a JSON Schema of 'type: \"object\"'"
    root_type = schema.get("type")
    if root_type != "object" and "$ref" not in schema:
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{root_type}\"'."
    return _walk(schema, ())


def _walk(node: Any, context: tuple[str, ...]) -> str | None:
    if not isinstance(node, dict):
        return None
    problem = _object_problem(node, context)
    if problem:
        return problem
    for key in _NESTED_MAPS:
        children = node.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                problem = _walk(child, (*context, key, str(name)))
                if problem:
                    return problem
    for key in _NESTED_LISTS:
        children = node.get(key)
        if isinstance(children, list):
            for position, child in enumerate(children):
                problem = _walk(child, (*context, key, str(position)))
                if problem:
                    return problem
    if isinstance(node.get("items"), dict):
        return _walk(node["items"], (*context, "items"))
    return None


def _object_problem(node: dict[str, Any], context: tuple[str, ...]) -> str | None:
    declared = node.get("type")
    is_object = declared == "object" or (isinstance(declared, list) and "object" in declared)
    if not is_object:
        return None
    where = f"In context=({', '.join(repr(c) for c in context)}{',' if len(context) == 1 else ''})"
    if node.get("additionalProperties") is not False:
        return f"{where}, 'additionalProperties' is required to be supplied and to be false."
    properties = node.get("properties", {})
    required = node.get("required", [])
    if isinstance(properties, dict) and isinstance(required, list):
        missing = [name for name in properties if name not in required]
        if missing:
            return (
                f"{where}, 'required' is required to be supplied and to be an array including every key "
                f"in properties. Missing '{missing[0]}'."
            )
    return None
