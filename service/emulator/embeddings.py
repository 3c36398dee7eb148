"""``POST /v1/embeddings``: validate a request body and compute the answer. PURE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.core.tokens import count_tokens

from . import errors
from .chat import Answer, AnswerContext
from .errors import EmulatedError
from .faults import parse_markers
from .synth import embedding_vector, encode_embedding

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192
DEFAULT_DIMENSIONS = 1536
MODEL_DIMENSIONS = {
    "text-embedding-3-large": 3072,
    "text-embedding-3-small": 1536,
    "text-embedding-ada-002": 1536,
}
FIXED_DIMENSION_MODELS = frozenset({"text-embedding-ada-002"})
ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated embeddings request; ``texts`` holds one string per input."""

    model: str
    texts: list[str]
    token_counts: list[int]
    dimensions: int
    encoding_format: str

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def rate_limit_tokens(self) -> int:
        return self.prompt_tokens


def _invalid_input() -> EmulatedError:
    return EmulatedError(
        400,
        "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
    )


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _normalise_inputs(raw: Any) -> tuple[list[str], list[int]]:
    """Inputs as texts plus their token counts; token arrays become a stable text form."""
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif _is_token_list(raw) and raw:
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise _invalid_input()
    if len(items) > MAX_INPUTS:
        raise EmulatedError(
            400,
            f"Too many inputs. The max number of inputs is {MAX_INPUTS}.",
            param="input",
            code="invalid_value",
        )
    texts: list[str] = []
    counts: list[int] = []
    for item in items:
        if isinstance(item, str) and item:
            texts.append(item)
            counts.append(count_tokens(item))
        elif _is_token_list(item) and item:
            texts.append("tokens:" + ",".join(str(t) for t in item))
            counts.append(len(item))
        else:
            raise _invalid_input()
    return texts, counts


def _dimensions(body: dict[str, Any], model: str) -> int:
    native = MODEL_DIMENSIONS.get(model, DEFAULT_DIMENSIONS)
    requested = body.get("dimensions")
    if requested is None:
        return native
    if model in FIXED_DIMENSION_MODELS:
        raise EmulatedError(400, "This model does not support specifying dimensions.", param="dimensions")
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise errors.invalid_type("dimensions", "an integer", requested)
    if requested < 1:
        raise errors.integer_out_of_range("dimensions", requested, minimum=1)
    if requested > native:
        raise errors.integer_out_of_range("dimensions", requested, maximum=native)
    return requested


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    """Validate ``body`` like the real endpoint; raises :class:`EmulatedError` (400)."""
    if not isinstance(body, dict):
        raise EmulatedError(400, "Invalid body: the request body must be a JSON object.")
    if "model" not in body:
        raise errors.missing_param("model")
    model = body["model"]
    if not isinstance(model, str):
        raise errors.invalid_type("model", "a string", model)
    if "input" not in body:
        raise errors.missing_param("input")
    texts, counts = _normalise_inputs(body["input"])
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise errors.invalid_value("encoding_format", encoding_format, ENCODING_FORMATS)
    return EmbeddingRequest(
        model=model,
        texts=texts,
        token_counts=counts,
        dimensions=_dimensions(body, model),
        encoding_format=str(encoding_format),
    )


def answer_embeddings(request: EmbeddingRequest, ctx: AnswerContext) -> Answer:
    """The embeddings ``list`` object; markers in any input apply to the whole request."""
    markers = parse_markers("\n".join(request.texts))
    if markers.status is not None:
        raise errors.error_for_status(markers.status, model=request.model, org=ctx.organization)
    if ctx.fails_flaky("\n".join(request.texts), markers.flaky):
        raise errors.error_for_status(500, model=request.model, org=ctx.organization)
    longest = max(request.token_counts)
    if markers.context_length or longest > MAX_INPUT_TOKENS:
        tokens = max(longest, MAX_INPUT_TOKENS + 1)
        raise EmulatedError(
            400,
            f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you requested "
            f"{tokens} tokens ({tokens} in your prompt; 0 for the completion). "
            "Please reduce your prompt; or completion length.",
            param="input",
            code="context_length_exceeded",
        )
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": encode_embedding(
                embedding_vector(text, request.dimensions, seed=ctx.seed), request.encoding_format
            ),
        }
        for index, text in enumerate(request.texts)
    ]
    body = {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": request.prompt_tokens, "total_tokens": request.prompt_tokens},
    }
    return Answer(body=body, prompt_tokens=request.prompt_tokens, completion_tokens=0)
