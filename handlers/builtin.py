"""The six built-in handlers (CONTRACT §4). Each is a :class:`HandlerSpec` factory; an
operator can override any attribute in ``[handlers.<name>]`` of the TOML config.

The chat handlers' prompts are their instructions, then a header of the item's fields
that sources parse (an email's subject, sender, recipients and date; a note's title and
front matter), each line left out when the item lacks it, then the text. The
instructions come first and never change, so prompt caching and packing (which states
them once per pack) work as before; the header starts with a placeholder line, so the
instructions are exactly the text before the first placeholder."""

from __future__ import annotations

from typing import Any

HEADER_LABELS = {
    "subject": "Subject",
    "from": "From",
    "to": "To",
    "date": "Date",
    "author": "Author",
}


def item_header(*fields: str) -> str:
    """Template lines for the item's fields, when present: ``{title?}`` alone (a note's
    title reads as a heading), then ``Label: {field?}`` per field. Each line is left out
    when the item lacks its field, and the whole header with its blank line when the
    item has none of them."""
    return "\n".join(["{title?}"] + [f"{HEADER_LABELS[f]}: {{{f}?}}" for f in fields])


def _prompt(instructions: str, *fields: str) -> str:
    return f"{instructions}\n\n{item_header(*fields)}\n\n{{text}}"


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
            "prompt": _prompt(
                "Summarise the following in two to four sentences.", "subject", "from", "date", "author"
            ),
            "output": SUMMARY_SCHEMA,
            "max_output_tokens": 300,
        },
        "classify": {
            "model": chat_model,
            "system": "You classify messages and notes into exactly one category.",
            "prompt": _prompt(
                "Classify the following text into one of: "
                + ", ".join(CLASSIFY_LABELS)
                + ". Give your confidence between 0 and 1.",
                "subject",
                "from",
                "to",
            ),
            "output": CLASSIFY_SCHEMA,
            "max_output_tokens": 60,
        },
        "extract": {
            "model": chat_model,
            "system": "You extract facts that are stated in the text; you never invent any.",
            "prompt": _prompt(
                "List the people, organizations, places, dates, amounts and action items "
                "mentioned in the following text. Use empty lists where there are none.",
                "subject",
                "from",
                "to",
                "date",
                "author",
            ),
            "output": EXTRACT_SCHEMA,
            "max_output_tokens": 500,
        },
        "tags": {
            "model": chat_model,
            "system": "You tag documents with short lowercase topic tags.",
            "prompt": _prompt("Give one to eight short lowercase tags for the following text.", "subject"),
            "output": TAGS_SCHEMA,
            "max_output_tokens": 80,
        },
        "sentiment": {
            "model": chat_model,
            "system": "You judge the overall sentiment of a text.",
            "prompt": _prompt(
                "What is the overall sentiment of the following text? Score from -1 (very negative) "
                "to 1 (very positive).",
                "subject",
            ),
            "output": SENTIMENT_SCHEMA,
            "max_output_tokens": 40,
        },
        "embed": {
            "model": embedding_model,
            "endpoint": "/v1/embeddings",
            "prompt": "{text}",
        },
    }
