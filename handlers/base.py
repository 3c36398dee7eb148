"""What a handler is: a pure recipe that turns an item into a provider request body and
the provider's answer back into a result.

The same body goes to the synchronous endpoint and into a Batch API JSONL line, and the
same ``parse`` reads a sync response or a batch output line, so both routes give the same
result for the same item.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

from handlers.templates import (
    MissingValuesError,
    Template,
    TemplateError,
    parse_template,
    template_fields,
)
from service.core.errors import BadItemError, InvalidOutputError
from service.core.items import Item

Endpoint = Literal["/v1/chat/completions", "/v1/embeddings"]
MAX_PACK = 100

__all__ = ["MAX_PACK", "HandlerSpec", "TemplateError", "template_fields"]


@dataclass(frozen=True)
class HandlerSpec:
    """One handler. ``output`` is ``"text"`` or a JSON Schema (an object schema)."""

    name: str
    model: str
    endpoint: Endpoint = "/v1/chat/completions"
    system: str | None = None
    prompt: str = "{text}"
    output: str | dict[str, Any] = "text"
    max_output_tokens: int = 512
    temperature: float | None = None
    strict: bool | None = None  # None: strict exactly when the schema allows it
    dimensions: int | None = None
    pack: int = 1  # up to this many items share one request (CONTRACT §12)
    flex: bool | None = None  # None: as routing.flex says; True: must be able to go flex

    def __post_init__(self) -> None:
        parse_template(self.prompt)
        if not isinstance(self.pack, int) or isinstance(self.pack, bool) or not 1 <= self.pack <= MAX_PACK:
            raise ValueError(f"pack must be a whole number from 1 to {MAX_PACK}, got {self.pack!r}")
        if self.pack > 1 and self.is_embedding:
            raise ValueError("pack works for chat handlers only (an embedding is one input per item)")
        if isinstance(self.output, dict):
            try:
                jsonschema.Draft202012Validator.check_schema(self.output)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"output is not a valid JSON Schema: {exc.message}") from None
        elif self.output != "text":
            raise ValueError('output must be "text" or a JSON Schema table')

    @functools.cached_property  # works on a frozen dataclass: it writes __dict__ directly
    def use_strict(self) -> bool:
        if self.strict is not None:
            return self.strict
        return isinstance(self.output, dict) and strict_compatible(self.output)

    @functools.cached_property
    def _validator(self) -> jsonschema.Draft202012Validator:
        assert isinstance(self.output, dict)
        return jsonschema.Draft202012Validator(self.output)

    @functools.cached_property
    def version(self) -> str:
        """``handler_version`` (CONTRACT §13): the first 12 hex digits of the SHA-256 of
        the canonical definition, everything that shapes the answer (routing choices such
        as ``flex`` do not)."""
        definition = {
            "model": self.model,
            "endpoint": self.endpoint,
            "system": self.system,
            "prompt": self.prompt,
            "output": self.output,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "strict": self.strict,
            "dimensions": self.dimensions,
            "pack": self.pack,
        }
        canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def is_embedding(self) -> bool:
        return self.endpoint == "/v1/embeddings"

    @functools.cached_property
    def template(self) -> Template:
        """The parsed ``prompt`` (:mod:`handlers.templates`)."""
        return parse_template(self.prompt)

    def render_prompt(self, item: Item, steps: Mapping[str, Any] | None = None) -> str:
        """Fill the template from ``text`` and ``fields`` (and, for a pipeline step, the
        earlier steps' results by handler name); a missing required value is a bad item."""
        values = {**item.fields, "text": item.text} if item.fields else {"text": item.text}
        try:
            return self.template.render(values, steps)
        except MissingValuesError as exc:
            raise BadItemError("missing_template_field", self._missing_message(exc.names)) from None

    def _missing_message(self, names: tuple[str, ...]) -> str:
        fields = [n for n in names if not n.startswith("steps.")]
        steps = [n for n in names if n.startswith("steps.")]
        parts = []
        if fields:
            parts.append(f"field(s) {', '.join(fields)} in 'fields'")
        if steps:
            parts.append(f"the result(s) of earlier pipeline step(s) {', '.join(steps)}")
        return f"handler {self.name!r} needs {' and '.join(parts)}"

    @property
    def result_fields(self) -> frozenset[str] | None:
        """The fields of this handler's result that a later step may name as
        ``{steps.<handler>.<field>}``; None for a text result (no fields; only the whole)."""
        if self.is_embedding:
            return frozenset({"embedding", "dimensions"})
        if isinstance(self.output, dict):
            return frozenset(self.output.get("properties") or {})
        return None

    def step_ref_problem(self, earlier: Mapping[str, HandlerSpec]) -> str | None:
        """For a pipeline validator: the first ``{steps.…}`` of the template that cannot be
        filled from ``earlier`` (the handlers of the steps that run before this one, by
        name), as a message; None when every reference can be."""
        for ref in self.template.step_refs:
            assert ref.step is not None
            written = ref.written
            before = earlier.get(ref.step)
            if before is None:
                return f"{written} names {ref.step!r}, which is no step that runs before {self.name!r}"
            if ref.field is None:
                continue
            known = before.result_fields
            if known is None:
                return (
                    f"{written}: {ref.step!r} gives a text result, which has no fields "
                    f"(use {{steps.{ref.step}}})"
                )
            if known and ref.field not in known:
                have = ", ".join(sorted(known))
                return f"{written}: {ref.step!r}'s result has no field {ref.field!r} (it has {have})"
        return None

    def build_body(
        self,
        item: Item,
        *,
        max_tokens_param: str = "max_completion_tokens",
        steps: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The request body for the provider (sync call or batch line); ``steps`` as for
        :meth:`render_prompt`."""
        if self.is_embedding:
            body: dict[str, Any] = {"model": self.model, "input": self.render_prompt(item, steps)}
            if self.dimensions is not None:
                body["dimensions"] = self.dimensions
            return body
        messages: list[dict[str, str]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.render_prompt(item, steps)})
        body = {"model": self.model, "messages": messages, max_tokens_param: self.max_output_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if isinstance(self.output, dict):
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": schema_name(self.name),
                    "schema": self.output,
                    "strict": self.use_strict,
                },
            }
        return body

    def parse(self, response: dict[str, Any]) -> Any:
        """Read a provider response body into this handler's result, or raise InvalidOutputError."""
        if self.is_embedding:
            return _parse_embedding(response)
        content, finish = chat_content(response)
        if self.output == "text":
            if finish == "length" and not content.strip():
                raise InvalidOutputError("output_truncated", "the answer was cut off before any text")
            return content.strip()
        return self._parse_json(content, finish)

    def _parse_json(self, content: str, finish: str | None) -> Any:
        try:
            value = json.loads(content)
        except json.JSONDecodeError as exc:
            if finish == "length":
                raise InvalidOutputError(
                    "output_truncated", f"the answer hit max_output_tokens={self.max_output_tokens}"
                ) from None
            raise InvalidOutputError("invalid_output", f"the answer is not JSON: {exc.msg}") from None
        return self.validate(value)

    def validate(self, value: Any) -> Any:
        """Check an already decoded answer (a text handler's string, or a structured
        handler's JSON value) as :meth:`parse` checks a single answer; the result, or
        InvalidOutputError. A packed answer's entries are checked one by one with this."""
        if self.output == "text":
            if not isinstance(value, str):
                raise InvalidOutputError("invalid_output", "the answer is not a string")
            return value.strip()
        errors = sorted(self._validator.iter_errors(value), key=str)
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            raise InvalidOutputError(
                "invalid_output", f"the answer does not match the schema at {where}: {errors[0].message}"
            )
        return value


def chat_content(response: dict[str, Any]) -> tuple[str, str | None]:
    """The text and ``finish_reason`` of a chat completion's first choice (a single or a
    packed answer); raises InvalidOutputError when there is none, or the model refused."""
    choices = response.get("choices") or []
    if not choices:
        raise InvalidOutputError("invalid_output", "the response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    if message.get("refusal"):
        raise InvalidOutputError("refused", f"the model refused: {str(message['refusal'])[:200]}")
    content = message.get("content")
    if not isinstance(content, str):
        raise InvalidOutputError("invalid_output", "the response has no text content")
    finish = choice.get("finish_reason")
    return content, finish if isinstance(finish, str) else None


def strict_compatible(schema: Any) -> bool:
    """Whether OpenAI's strict structured outputs accept this schema: every object lists
    all its properties as required and sets ``additionalProperties: false``."""
    if isinstance(schema, list):
        return all(strict_compatible(s) for s in schema)
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is not False or set(schema.get("required", [])) != set(props):
            return False
    return all(strict_compatible(v) for k, v in schema.items() if k not in ("enum", "const", "default"))


@functools.lru_cache(maxsize=256)  # one per handler
def schema_name(name: str) -> str:
    # The API wants ^[a-zA-Z0-9_-]{1,64}$ for json_schema.name.
    clean = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    return clean[:64] or "result"


def _parse_embedding(response: dict[str, Any]) -> dict[str, Any]:
    data = response.get("data") or []
    if not data or not isinstance(data[0], dict):
        raise InvalidOutputError("invalid_output", "the embeddings response has no data")
    vector = data[0].get("embedding")
    if not isinstance(vector, list) or not all(isinstance(x, int | float) for x in vector):
        raise InvalidOutputError("invalid_output", "the embedding is not a list of numbers")
    return {"embedding": [float(x) for x in vector], "dimensions": len(vector)}
