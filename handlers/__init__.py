"""Built-in handlers and the registry that merges them with handlers defined in TOML."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from handlers.base import MAX_PACK, HandlerSpec
from handlers.builtin import builtin_definitions
from handlers.templates import Template, TemplateError, parse_template, render_value, template_fields

__all__ = [
    "HandlerConfigError",
    "HandlerSpec",
    "Template",
    "TemplateError",
    "build_registry",
    "parse_template",
    "render_value",
    "template_fields",
]

HANDLER_KEYS = frozenset(
    {
        "model",
        "endpoint",
        "system",
        "prompt",
        "output",
        "max_output_tokens",
        "temperature",
        "strict",
        "dimensions",
        "pack",
        "flex",
    }
)


class HandlerConfigError(ValueError):
    """A handler table in the config is unusable; ``key`` names it (``handlers.gist.prompt``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


_INT_KEYS = frozenset({"max_output_tokens", "pack", "dimensions"})
_BOOL_KEYS = frozenset({"strict", "flex"})


def _from_env_strings(table: Mapping[str, Any]) -> dict[str, Any]:
    """Handler keys set through the environment (``ENRICHD_HANDLERS__TAGS__PACK=8``) arrive
    as strings: whole numbers and booleans are read from them; anything else stays as is
    (and is refused with the key's name if it is wrong)."""
    out = dict(table)
    for key, value in table.items():
        if not isinstance(value, str):
            continue
        text = value.strip()
        if key in _INT_KEYS and text.lstrip("-").isdigit():
            out[key] = int(text)
        elif key in _BOOL_KEYS and text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
        elif key == "temperature":
            try:
                out[key] = float(text)
            except ValueError:
                pass
    return out


def build_registry(
    overrides: Mapping[str, Mapping[str, Any]],
    *,
    chat_model: str,
    embedding_model: str,
    step_handlers: Collection[str] = (),
) -> dict[str, HandlerSpec]:
    """Built-ins, then each ``[handlers.NAME]`` table merged over the built-in of that name
    (or over plain chat defaults for a new handler).

    ``step_handlers``: the handlers that run as a step of some pipeline. Only those may
    name earlier steps' results (``{steps.…}``) in their prompt; any other handler has no
    earlier steps, so such a prompt is refused (``handlers.<name>.prompt``). Whether each
    reference is to a step that runs before is the pipeline's check
    (:meth:`HandlerSpec.step_ref_problem`)."""
    definitions = builtin_definitions(chat_model, embedding_model)
    names = list(definitions) + [n for n in overrides if n not in definitions]
    registry: dict[str, HandlerSpec] = {}
    for name in names:
        base = dict(definitions.get(name, {"model": chat_model}))
        table = _from_env_strings(overrides.get(name, {}))
        unknown = sorted(set(table) - HANDLER_KEYS)
        if unknown:
            raise HandlerConfigError(f"handlers.{name}.{unknown[0]}", "unknown key")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise HandlerConfigError(
                f"handlers.{name}", "a handler name is letters, digits, '-' and '_' only"
            )
        if (
            name in overrides
            and "output" in table
            and table["output"] != "text"
            and not isinstance(table["output"], dict)
        ):
            raise HandlerConfigError(f"handlers.{name}.output", 'must be "text" or a JSON Schema table')
        if table.get("endpoint") == "/v1/embeddings" and name not in definitions:
            base.pop("output", None)
        base.update(table)
        pack = base.get("pack", 1)
        if not isinstance(pack, int) or isinstance(pack, bool) or not 1 <= pack <= MAX_PACK:
            raise HandlerConfigError(
                f"handlers.{name}.pack", f"must be a whole number from 1 to {MAX_PACK}, got {pack!r}"
            )
        if "flex" in table and not isinstance(table["flex"], bool):
            raise HandlerConfigError(f"handlers.{name}.flex", "must be true or false")
        try:
            spec = HandlerSpec(name=name, **base)
        except TemplateError as exc:
            raise HandlerConfigError(f"handlers.{name}.prompt", str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise HandlerConfigError(f"handlers.{name}", str(exc).splitlines()[0]) from None
        if spec.template.step_refs and name not in step_handlers:
            ref = spec.template.step_refs[0]
            raise HandlerConfigError(
                f"handlers.{name}.prompt",
                f"{ref.written} is an earlier pipeline step's result, but {name!r} is no step of "
                "any pipeline (a handler fed on its own has no earlier steps)",
            )
        registry[name] = spec
    return registry
