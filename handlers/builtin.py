"""The six built-in handlers (CONTRACT §4). Each is a :class:`HandlerSpec` factory; an
operator can override any attribute in ``[handlers.<name>]`` of the TOML config."""

from __future__ import annotations

from typing import Any

SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string", "description": "Two to four sentences."}},
    "required": ["summary"],
    "additionalProperties": False,
}

CLASSIFY_LABELS = ["billing", "support", "sales", "personal", "newsletter", "notification", "spam", "other"]
CLASSIFY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": CLASSIFY_LABELS},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}

_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
EXTRACT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": _STRINGS,
        "organizations": _STRINGS,
        "places": _STRINGS,
        "dates": _STRINGS,
        "amounts": _STRINGS,
        "action_items": _STRINGS,
    },
    "required": ["people", "organizations", "places", "dates", "amounts", "action_items"],
    "additionalProperties": False,
}

TAGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 8}},
    "required": ["tags"],
    "additionalProperties": False,
}

SENTIMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative", "mixed"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "required": ["sentiment", "score"],
    "additionalProperties": False,
}


def builtin_definitions(chat_model: str, embedding_model: str) -> dict[str, dict[str, Any]]:
    """Keyword arguments of each built-in HandlerSpec, before operator overrides."""
    return {
        "summarize": {
            "model": chat_model,
            "system": "You summarise documents faithfully and concisely. Answer in the document's language.",
            "prompt": "Summarise the following in two to four sentences.\n\n{text}",
            "output": SUMMARY_SCHEMA,
            "max_output_tokens": 300,
        },
        "classify": {
            "model": chat_model,
            "system": "You classify messages and notes into exactly one category.",
            "prompt": "Classify the following text into one of: "
            + ", ".join(CLASSIFY_LABELS)
            + ". Give your confidence between 0 and 1.\n\n{text}",
            "output": CLASSIFY_SCHEMA,
            "max_output_tokens": 60,
        },
        "extract": {
            "model": chat_model,
            "system": "You extract facts that are stated in the text; you never invent any.",
            "prompt": "List the people, organizations, places, dates, amounts and action items "
            "mentioned in the following text. Use empty lists where there are none.\n\n{text}",
            "output": EXTRACT_SCHEMA,
            "max_output_tokens": 500,
        },
        "tags": {
            "model": chat_model,
            "system": "You tag documents with short lowercase topic tags.",
            "prompt": "Give one to eight short lowercase tags for the following text.\n\n{text}",
            "output": TAGS_SCHEMA,
            "max_output_tokens": 80,
        },
        "sentiment": {
            "model": chat_model,
            "system": "You judge the overall sentiment of a text.",
            "prompt": "What is the overall sentiment of the following text? Score from -1 (very negative) "
            "to 1 (very positive).\n\n{text}",
            "output": SENTIMENT_SCHEMA,
            "max_output_tokens": 40,
        },
        "embed": {
            "model": embedding_model,
            "endpoint": "/v1/embeddings",
            "prompt": "{text}",
        },
    }
