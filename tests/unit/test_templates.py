"""Prompt templates: parsing, rendering, step results, and the built-in prompts over the
sample emails and notes."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest

from handlers import HandlerConfigError, HandlerSpec, TemplateError, build_registry, parse_template
from handlers.templates import MissingValuesError, render_value, template_fields
from service.core import packing
from service.core.errors import BadItemError
from service.core.formats import file_items
from service.core.items import Item, item_from_object

FIXTURES = Path(__file__).parent.parent / "fixtures"
REG = build_registry({}, chat_model="gpt-4o-mini", embedding_model="text-embedding-3-small")


def render(template: str, steps: dict[str, Any] | None = None, **values: str) -> str:
    return parse_template(template).render(values, steps)


def spec(prompt: str, name: str = "gist", **kw: Any) -> HandlerSpec:
    return HandlerSpec(name=name, model="m", prompt=prompt, output="text", **kw)


# -- fields -----------------------------------------------------------------------------


def test_required_fields_are_filled() -> None:
    assert render("About {title}:\n\n{text}", title="Q3", text="body") == "About Q3:\n\nbody"
    # a field that is present but empty is not missing
    assert render("[{title}] {text}", title="", text="b") == "[] b"


def test_a_missing_required_field_is_missing_template_field_naming_handler_and_field() -> None:
    with pytest.raises(MissingValuesError) as info:
        render("{title} {author} {text}", text="x")
    assert info.value.names == ("author", "title")
    with pytest.raises(BadItemError) as bad:
        spec("Summarise {title}:\n\n{text}").render_prompt(Item(id="1", handler="gist", text="x"))
    assert bad.value.code == "missing_template_field"
    assert str(bad.value.message) == "handler 'gist' needs field(s) title in 'fields'"


def test_a_missing_optional_field_renders_empty() -> None:
    assert render("({title?}) {text}", text="b") == "() b"
    assert render("({title?}) {text}", title="T", text="b") == "(T) b"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "Intro.\n\nbody"),
        ({"subject": "Hi"}, "Intro.\n\nSubject: Hi\n\nbody"),
        ({"title": "T", "from": "a@b"}, "Intro.\n\nT\nFrom: a@b\n\nbody"),
        ({"subject": ""}, "Intro.\n\nbody"),  # an empty value leaves its line out too
    ],
)
def test_lines_of_missing_optional_fields_are_left_out(values: dict[str, str], expected: str) -> None:
    template = "Intro.\n\n{title?}\nSubject: {subject?}\nFrom: {from?}\n\n{text}"
    assert render(template, text="body", **values) == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Subject: {subject?}\n\n{text}", "body"),  # at the start: the blank line after goes
        ("{text}\n\nSubject: {subject?}", "body"),  # at the end: the blank line before goes
        ("A\nSubject: {subject?}\n{text}", "A\nbody"),  # no blank lines around: just the line
        ("A\n\n{x?}\n\n{y?}\n\n{text}", "A\n\nbody"),  # several runs merge their blank lines
        ("A\n{x?} and {text}\nB", "A\n and body\nB"),  # a line with a required value stays
        ("A\r\nSubject: {subject?}\r\n\r\n{text}", "A\r\n\r\nbody"),  # CRLF templates too
        ("{x?}", ""),
    ],
)
def test_line_elision_around_blank_lines(template: str, expected: str) -> None:
    assert render(template, text="body") == expected


def test_a_values_own_line_breaks_are_text_not_template_lines() -> None:
    assert render("{text}\nSubject: {subject?}", text="one\n\ntwo") == "one\n\ntwo"
    assert render("{a?}\n{text}", a="x\ny", text="t") == "x\ny\nt"


def test_literal_braces() -> None:
    assert render("{{text}} is {text}", text="b") == "{text} is b"
    assert render("{{{text}}}", text="b") == "{b}"
    assert render('JSON like {{"a": 1}}: {text}', text="b") == 'JSON like {"a": 1}: b'
    assert render("}}{{") == "}{"


def test_field_names_may_hold_hyphens_and_unicode_letters() -> None:
    assert render("{due-date} {café}", **{"due-date": "1 May", "café": "x"}) == "1 May x"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{text", "the '{' at character 1 is never closed; write '{{' for a literal brace"),
        ("text}", "a single '}' at character 5; write '}}' for a literal brace"),
        ("{}", "an empty placeholder {}"),
        ("{0}", "placeholder {0} must be a plain name such as {text} or {title}"),
        ("{ text }", "placeholder { text } must be a plain name"),
        ("{a??}", "placeholder {a??} must be a plain name"),
        ("{a.b}", "placeholder {a.b} must be a plain name"),
        ("{a[0]}", "placeholder {a[0]} must be a plain name"),
        ("{text:>10}", "placeholder {text:>10} may not carry a format spec or conversion"),
        ("{text!r}", "placeholder {text!r} may not carry a format spec or conversion"),
        ("{a{b}}", "placeholders do not nest"),
        ("{steps}", "placeholder {steps} names no step: write {steps.<handler>}"),
        ("{steps.}", "placeholder {steps.} names no step"),
        ("{steps.a.b.c}", "placeholder {steps.a.b.c}: a step is named {steps.<handler>}"),
        ("{steps.a.}", "placeholder {steps.a.}: a step is named"),
        ("{steps.a b}", "placeholder {steps.a b}: a step is named"),
    ],
)
def test_bad_templates_are_refused_with_a_clear_message(template: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse_template(template)
    assert message in str(info.value)


def test_a_bad_template_in_the_config_names_the_key() -> None:
    with pytest.raises(HandlerConfigError) as info:
        build_registry({"gist": {"prompt": "{title:>9}"}}, chat_model="m", embedding_model="e")
    assert info.value.key == "handlers.gist.prompt"
    assert "format spec" in str(info.value)


def test_every_accepted_template_is_also_a_str_format_template() -> None:
    # packing reads the static instructions with string.Formatter: it must not choke
    accepted = ["{title?} {text}", "{steps.a-b.c_d?}", "{{x}} {due-date}"]
    for template in accepted + [s.prompt for s in REG.values()]:
        parse_template(template)
        list(string.Formatter().parse(template))


# -- what a template names ----------------------------------------------------------------


def test_the_template_says_what_it_references() -> None:
    t = parse_template("{title?} {text} {steps.extract.people} {steps.classify?} {steps.extract.dates?}")
    assert t.fields == {"title", "text"} and t.required_fields == {"text"}
    assert t.steps == {"extract", "classify"}
    assert [(p.step, p.field, p.optional) for p in t.step_refs] == [
        ("extract", "people", False),
        ("classify", None, True),
        ("extract", "dates", True),
    ]
    assert [p.written for p in t.step_refs] == [
        "{steps.extract.people}",
        "{steps.classify?}",
        "{steps.extract.dates?}",
    ]
    assert template_fields("{a} {b?} {steps.c.d}") == {"a", "b"}


@pytest.mark.parametrize(
    ("template", "prefix"),
    [
        ("Intro.\n\n{title?}\nSubject: {subject?}\n\n{text}", "Intro.\n\n"),
        ("Tag this.\nSubject: {subject?}\n\n{text}", "Tag this.\n"),  # not the optional line's label
        ("Summarise the note titled {title}:\n\n{text}", "Summarise the note titled "),
        ("Subject: {subject?}\n{text}", ""),
        ("  \n{text}", ""),
        ("{{x}} {text}", "{x} "),
        ("no placeholder", ""),
    ],
)
def test_static_prefix(template: str, prefix: str) -> None:
    t = parse_template(template)
    assert t.static_prefix == prefix
    for values in ({"text": "b", "title": ""}, {"text": "b", "title": "T", "subject": "S"}):
        assert t.render(values).startswith(prefix)


def test_parsing_is_cached() -> None:
    assert parse_template("{text} once") is parse_template("{text} once")
    gist = spec("{title?} {text}")
    assert gist.template is gist.template is parse_template("{title?} {text}")


# -- earlier steps' results -----------------------------------------------------------------

STEPS: dict[str, Any] = {
    "summary": "A short summary.",
    "extract": {"people": ["Ann", "Bo"], "amounts": [], "total": 12.5, "urgent": True, "due": None},
    "classify": {"label": "billing", "confidence": 0.9},
    "nested": {"rows": [{"a": 1}, {"a": 2}], "meta": {"k": "v é"}},
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{steps.summary}", "A short summary."),  # a text result as is
        ("{steps.classify}", '{"label":"billing","confidence":0.9}'),  # structured: compact JSON
        ("{steps.classify.label}", "billing"),
        ("{steps.classify.confidence}", "0.9"),
        ("{steps.extract.urgent}", "true"),
        ("{steps.extract.people}", "Ann, Bo"),  # a list of strings, joined
        ("[{steps.extract.amounts}]", "[]"),  # an empty list is present, and empty
        ("{steps.nested.rows}", '[{"a":1},{"a":2}]'),  # a list of objects: JSON
        ("{steps.nested.meta}", '{"k":"v é"}'),
        # (a required value on the line keeps it: a line of empty optional ones is left out)
        ("({steps.extract.due?}) {steps.summary}", "() A short summary."),  # null counts as absent
        ("({steps.draft?}) {steps.summary}", "() A short summary."),
        ("({steps.classify.missing?}) {steps.summary}", "() A short summary."),
        ("({steps.summary.field?}) {steps.summary}", "() A short summary."),  # text: no fields
    ],
)
def test_step_results_render(template: str, expected: str) -> None:
    assert render(template, STEPS) == expected


def test_missing_required_step_results_name_the_steps() -> None:
    with pytest.raises(MissingValuesError) as info:
        render("{steps.draft} {steps.extract.due} {steps.classify.label}", STEPS)
    assert info.value.names == ("steps.draft", "steps.extract.due")
    gist = spec("{text}\n\n{steps.classify.label}\n{title}")
    with pytest.raises(BadItemError) as bad:
        gist.render_prompt(Item(id="1", handler="gist", text="x"))  # fed on its own: no steps
    assert bad.value.code == "missing_template_field"
    assert bad.value.message == (
        "handler 'gist' needs field(s) title in 'fields' and "
        "the result(s) of earlier pipeline step(s) steps.classify.label"
    )


def test_optional_step_lines_are_left_out() -> None:
    template = "Reply to this.\n\nCategory: {steps.classify.label?}\nFacts: {steps.extract?}\n\n{text}"
    assert render(template, {}, text="b") == "Reply to this.\n\nb"
    assert render(template, {"classify": {"label": "x"}}, text="b") == "Reply to this.\n\nCategory: x\n\nb"


def test_build_body_passes_the_steps_on() -> None:
    draft = spec("Draft a reply to this {steps.classify.label} email.\n\n{text}", name="draft")
    body = draft.build_body(Item(id="1", handler="draft", text="Hi"), steps=STEPS)
    assert body["messages"][-1]["content"] == "Draft a reply to this billing email.\n\nHi"


def test_render_value() -> None:
    assert render_value("x") == "x"
    assert render_value([1, "a", False]) == "1, a, false"
    assert render_value([[1], 2]) == "[[1],2]"
    assert render_value({"b": 1, "a": [1]}) == '{"b":1,"a":[1]}'  # the result's own order


def test_a_plain_handler_naming_steps_is_refused_at_start_up() -> None:
    table = {"draft": {"prompt": "Reply ({steps.classify.label?}):\n\n{text}"}}
    with pytest.raises(HandlerConfigError) as info:
        build_registry(table, chat_model="m", embedding_model="e")
    assert info.value.key == "handlers.draft.prompt"
    assert str(info.value) == (
        "handlers.draft.prompt: {steps.classify.label?} is an earlier pipeline step's result, "
        "but 'draft' is no step of any pipeline (a handler fed on its own has no earlier steps)"
    )
    reg = build_registry(table, chat_model="m", embedding_model="e", step_handlers={"draft"})
    assert reg["draft"].template.steps == {"classify"}


def test_step_ref_problem_for_the_pipeline_validator() -> None:
    reg = build_registry(
        {
            "gist": {"output": "text"},
            "draft": {"prompt": "{steps.classify.label} {steps.gist?} {steps.embed.dimensions}\n{text}"},
        },
        chat_model="m",
        embedding_model="e",
        step_handlers={"draft"},
    )
    draft = reg["draft"]
    earlier = {n: reg[n] for n in ("classify", "gist", "embed")}
    assert draft.step_ref_problem(earlier) is None
    assert draft.step_ref_problem({"gist": reg["gist"], "embed": reg["embed"]}) == (
        "{steps.classify.label} names 'classify', which is no step that runs before 'draft'"
    )
    bad_field = reg["draft"].__class__(name="d2", model="m", prompt="{steps.classify.lable}")
    assert bad_field.step_ref_problem(earlier) == (
        "{steps.classify.lable}: 'classify''s result has no field 'lable' (it has confidence, label)"
    )
    of_text = reg["draft"].__class__(name="d3", model="m", prompt="{steps.gist.summary}")
    assert of_text.step_ref_problem(earlier) == (
        "{steps.gist.summary}: 'gist' gives a text result, which has no fields (use {steps.gist})"
    )
    assert reg["classify"].result_fields == {"label", "confidence"}
    assert reg["gist"].result_fields is None


# -- the built-in prompts -------------------------------------------------------------------

CHAT_BUILTINS = [n for n, s in REG.items() if not s.is_embedding]


def _instructions(name: str) -> str:
    return REG[name].prompt.split("\n\n", 1)[0]


def test_builtins_without_fields_render_as_before() -> None:
    # instructions, a blank line, the text: what the prompts were before they named fields
    for name in CHAT_BUILTINS:
        rendered = REG[name].render_prompt(Item(id="1", handler=name, text="body"))
        assert rendered == _instructions(name) + "\n\nbody", name
    assert REG["embed"].render_prompt(Item(id="1", handler="embed", text="body")) == "body"


def test_builtins_show_the_fields_sources_parse_after_their_instructions() -> None:
    email = Item(
        id="1",
        handler="x",
        text="body",
        fields={"subject": "Invoice 7", "from": "Ann <a@x.io>", "to": "b@y.io", "date": "Mon, 1 Jan"},
    )
    note = Item(id="2", handler="x", text="body", fields={"title": "Q3 plan", "author": "[[Bo]]"})
    rendered = {n: REG[n].render_prompt(email) for n in CHAT_BUILTINS}
    assert rendered["summarize"] == (
        _instructions("summarize") + "\n\nSubject: Invoice 7\nFrom: Ann <a@x.io>\nDate: Mon, 1 Jan\n\nbody"
    )
    assert "To: b@y.io" in rendered["classify"] and "To: b@y.io" in rendered["extract"]
    assert all("Subject: Invoice 7\n" in r for r in rendered.values())
    header = "Q3 plan\nAuthor: [[Bo]]"
    assert REG["extract"].render_prompt(note) == _instructions("extract") + f"\n\n{header}\n\nbody"
    for name in CHAT_BUILTINS:
        assert REG[name].render_prompt(note).startswith(_instructions(name) + "\n\nQ3 plan\n"), name


def test_builtins_pack_their_instructions_once_and_keep_the_header() -> None:
    # packing states the text before the first placeholder once, in the system message
    email = Item(id="1", handler="tags", text="body", fields={"subject": "Hi", "from": "a@b"})
    for name in CHAT_BUILTINS:
        assert packing.static_instructions(REG[name].prompt) == _instructions(name) + "\n\n", name
        assert REG[name].template.static_prefix == _instructions(name) + "\n\n", name
        assert packing.item_block(REG[name], Item(id="1", handler=name, text="body")) == "body"
    assert packing.item_block(REG["tags"], email) == "Subject: Hi\n\nbody"


def _sample_items() -> list[tuple[str, Item]]:
    """Every item the folder formats read from the sample emails and notes (and the
    readable nasty emails), as the watched folders make them."""
    paths = sorted((FIXTURES / "emails").iterdir()) + sorted((FIXTURES / "notes").rglob("*.md"))
    paths += sorted(p for p in (FIXTURES / "nasty").iterdir() if p.suffix in (".eml", ".mbox", ".md"))
    out = []
    for path in paths:
        try:
            entries = list(file_items(path.name, path.read_bytes()))
        except ValueError:  # FileFormatError: a nasty file that is no item at all
            continue
        out += [(path.name, item_from_object(e, "x")) for e in entries if isinstance(e, dict)]
    return out


SAMPLES = _sample_items()


def test_the_samples_are_the_ones_expected() -> None:
    emails = [n for n, i in SAMPLES if i.source == "email"]
    assert len([n for n in emails if not n.endswith(".mbox")]) >= 13 + 3
    assert len([n for n, i in SAMPLES if i.source == "note"]) >= 32
    assert sum(1 for _, i in SAMPLES if "subject" not in i.fields) >= 30  # notes and the licence text


@pytest.mark.parametrize("handler", list(REG))
def test_every_sample_email_and_note_renders_for_every_builtin(handler: str) -> None:
    spec = REG[handler]
    for name, item in SAMPLES:
        rendered = spec.render_prompt(item)  # never missing_template_field
        assert rendered.endswith(item.text), name
        if spec.is_embedding:
            continue
        assert rendered.startswith(_instructions(handler) + "\n\n"), name
        if "subject" in item.fields:
            assert f"Subject: {item.fields['subject']}\n" in rendered, name
        if "title" in item.fields:
            assert f"\n\n{item.fields['title']}\n" in rendered, name
        spec.build_body(item)


def test_a_gmail_sample_reaches_the_model_with_subject_and_sender() -> None:
    [(_, item)] = [(n, i) for n, i in SAMPLES if n == "gmail.eml"]
    content = REG["classify"].build_body(item)["messages"][-1]["content"]
    header = content.split("\n\n")[1].splitlines()
    assert [line.split(": ", 1)[0] for line in header] == ["Subject", "From", "To"]
    assert header[0] == f"Subject: {item.fields['subject']}"
