"""The emulator over real HTTP on loopback, driven only through the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import Batch

from service.emulator import Emulator, EmulatorConfig, FaultConfig

API_KEY = "sk-emulator-test-0123456789abcdef"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
NOTE = (
    "The quarterly invoice from Acme Corp is overdue by thirty days. "
    "Accounting should call their finance team before Friday."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "sender": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": ["string", "null"]}},
            "required": ["name", "email"],
            "additionalProperties": False,
        },
    },
    "required": ["summary", "sentiment", "tags", "urgency", "sender"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True},
}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(EmulatorConfig(api_key=API_KEY, batch_delay_s=0.3, seed=0, unknown_models=["gpt-retired"]))
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=emulator.base_url, api_key=API_KEY, max_retries=0, timeout=10) as sdk:
        yield sdk


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "You triage notes."}, {"role": "user", "content": text}]


def chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": user(text), "max_tokens": 300, **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


async def submit(
    client: AsyncOpenAI, lines: list[dict[str, Any]], endpoint: Any = "/v1/chat/completions"
) -> Batch:
    uploaded = await client.files.create(
        file=("batch.jsonl", jsonl(lines), "application/jsonl"), purpose="batch"
    )
    return await client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")


async def wait_for(
    client: AsyncOpenAI, batch_id: str, done: Callable[[Batch], bool], timeout_s: float = 15
) -> Batch:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        batch = await client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert asyncio.get_running_loop().time() < deadline, f"batch stuck in {batch.status}"
        await asyncio.sleep(0.05)


async def wait_terminal(client: AsyncOpenAI, batch_id: str, timeout_s: float = 15) -> Batch:
    return await wait_for(client, batch_id, lambda b: b.status in TERMINAL, timeout_s)


async def read_lines(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines() if line.strip()]


# --- sync endpoints ------------------------------------------------------------------------------


async def test_chat_text_is_deterministic_and_openai_shaped(client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=user(NOTE))
    first = raw.parse()
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE))
    assert raw.headers["x-request-id"].startswith("req_")
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion"
    assert first.system_fingerprint and first.model == "gpt-4o-mini"
    message = first.choices[0].message
    assert message.role == "assistant" and message.refusal is None
    assert message.content == second.choices[0].message.content
    assert message.content and message.content.startswith("The quarterly invoice from Acme Corp")
    assert first.choices[0].finish_reason == "stop"
    assert (
        first.usage and first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    )


async def test_chat_json_schema_output_is_valid(client: AsyncOpenAI) -> None:
    for text in (NOTE, "Server down in region eu-west, customers angry", "Lunch on Friday?"):
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=user(text),
            response_format=JSON_SCHEMA_FORMAT,
            max_completion_tokens=500,
        )
        content = completion.choices[0].message.content
        assert content is not None
        jsonschema.validate(json.loads(content), SCHEMA)


async def test_chat_truncates_at_max_tokens(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user(NOTE), response_format=JSON_SCHEMA_FORMAT, max_tokens=4
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage and completion.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.choices[0].message.content or "")


async def test_embeddings_base64_default_and_float(client: AsyncOpenAI) -> None:
    default = await client.embeddings.create(model="text-embedding-3-small", input=["hello world", "bye"])
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "bye"], encoding_format="float"
    )
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 1536
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding)
    assert sum(v * v for v in floats.data[1].embedding) == pytest.approx(1.0, rel=1e-4)
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    large = await client.embeddings.create(model="text-embedding-3-large", input="x")
    assert len(large.data[0].embedding) == 3072
    small = await client.embeddings.create(model="text-embedding-3-large", input="x", dimensions=256)
    assert len(small.data[0].embedding) == 256


async def test_wrong_key_is_401_without_echoing_it(emulator: Emulator) -> None:
    wrong = "sk-wrong-key-that-must-stay-secret-9876"
    async with AsyncOpenAI(base_url=emulator.base_url, api_key=wrong, max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert caught.value.code == "invalid_api_key"
    body = json.dumps(caught.value.body)
    assert wrong not in body and "sk-wr****9876" in body


async def test_scripted_429_has_retry_after_then_recovers(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(script=[429, 500, 0], retry_after_s=2))
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert limited.value.response.headers["retry-after"] == "2"
    assert limited.value.response.headers["retry-after-ms"] == "2000"
    assert limited.value.code == "rate_limit_exceeded"
    assert "requests per min (RPM)" in limited.value.message
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert failed.value.type == "server_error"
    assert (await client.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))).choices
    assert emulator.stats["status_counts"][429] == 1


async def test_random_5xx_rates(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(rate_503=1.0))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert caught.value.status_code == 503
    emulator.set_faults(FaultConfig(rate_500=1.0))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert caught.value.status_code == 500
    assert "Sorry about that" in caught.value.message


async def test_timeout_fault(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(rate_timeout=1.0, timeout_sleep_s=2))
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("hi"), timeout=0.5)


async def test_markers(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("x [[emulator:status=404]]"))
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("x [[emulator:status=403]]"))
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=user("x [[emulator:context_length]]")
        )
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "messages"
    refusal = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("x [[emulator:refusal]]")
    )
    assert refusal.choices[0].message.content is None and refusal.choices[0].message.refusal
    broken = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("x [[emulator:invalid_json]]"), response_format=JSON_SCHEMA_FORMAT
    )
    assert broken.choices[0].finish_reason == "stop"
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.choices[0].message.content or "")


async def test_flaky_marker_fails_n_times_then_succeeds(client: AsyncOpenAI) -> None:
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=user("y [[emulator:flaky=2]]"))
    # another text has its own count; the third request with the first text succeeds
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("z [[emulator:flaky=1]]"))
    ok = await client.chat.completions.create(model="gpt-4o-mini", messages=user("y [[emulator:flaky=2]]"))
    assert ok.choices[0].message.content


async def test_bad_requests_and_unknown_models(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert missing.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="gpt-retired", messages=user("hi"))
    assert unknown.value.code == "model_not_found"
    assert (await client.chat.completions.create(model="any-name-works", messages=user("hi"))).choices


async def test_rpm_limit_headers_and_retry_after(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(rpm=2, tpm=100_000))
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=user("a"), max_tokens=50
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100_000 - 50
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    await client.chat.completions.create(model="gpt-4o-mini", messages=user("b"))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=user("c"))
    headers = caught.value.response.headers
    assert 55 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert caught.value.type == "requests"
    # Limits are per model.
    assert (await client.chat.completions.create(model="gpt-4o", messages=user("d"))).choices


# --- files ---------------------------------------------------------------------------------------------


async def test_files_roundtrip_and_jsonl_rule(client: AsyncOpenAI) -> None:
    data = jsonl([chat_line("a", "x")])
    uploaded = await client.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(data) and uploaded.status == "processed"
    assert uploaded.expires_at == uploaded.created_at + 2_592_000
    assert (await client.files.retrieve(uploaded.id)).filename == "batch.jsonl"
    assert (await (await client.files.content(uploaded.id)).aread()) == data
    listed = [f.id async for f in client.files.list(purpose="batch")]
    assert uploaded.id in listed
    malformed = await client.files.create(
        file=("bad.jsonl", b"{not json\n", "application/jsonl"), purpose="batch"
    )
    assert malformed.status == "processed"
    with pytest.raises(openai.BadRequestError) as wrong_name:
        await client.files.create(file=("batch.txt", data, "text/plain"), purpose="batch")
    assert "Must be .jsonl" in wrong_name.value.message
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=data, purpose="batch")  # raw bytes are sent as "upload"
    assert (await client.files.delete(uploaded.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)


# --- batches -------------------------------------------------------------------------------------------


async def test_full_batch_lifecycle(emulator: Emulator, client: AsyncOpenAI) -> None:
    lines = [
        chat_line(f"item-{i}", f"Note {i}: {NOTE}", response_format=JSON_SCHEMA_FORMAT) for i in range(48)
    ]
    lines.append(chat_line("item-http-500", "boom [[emulator:status=500]]"))
    lines.append(chat_line("item-line-error", "odd [[emulator:line_error=server_unavailable]]"))
    created = await submit(client, lines)
    assert created.status == "validating"
    assert (created.request_counts.total, created.request_counts.completed) == (0, 0)
    assert created.expires_at == created.created_at + 86_400
    assert created.output_file_id is None and created.errors is None

    seen_progress = await wait_for(client, created.id, lambda b: b.status != "validating")
    assert seen_progress.request_counts is not None and seen_progress.request_counts.total == 50
    batch = await wait_terminal(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts and (batch.request_counts.completed, batch.request_counts.failed) == (48, 2)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.model == "gpt-4o-mini" and batch.usage and batch.usage.output_tokens > 0

    outputs = await read_lines(client, batch.output_file_id)
    failures = await read_lines(client, batch.error_file_id)
    assert (await client.files.retrieve(batch.output_file_id or "")).purpose == "batch_output"
    by_id = {line["custom_id"]: line for line in outputs + failures}
    assert set(by_id) == {line["custom_id"] for line in lines}
    assert [line["custom_id"] for line in outputs] != [line["custom_id"] for line in lines[:48]]
    for line in outputs:
        assert line["error"] is None and line["response"]["status_code"] == 200
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMA)
    http_error = by_id["item-http-500"]
    assert http_error["error"] is None and http_error["response"]["status_code"] == 500
    assert http_error["response"]["body"]["error"]["type"] == "server_error"
    non_http = by_id["item-line-error"]
    assert non_http["response"] is None and non_http["error"]["code"] == "server_unavailable"

    stats = emulator.stats
    assert stats["batches_created"] == 1 and stats["batch_lines_total"] == 50
    assert set(stats["custom_ids_submitted"].values()) == {1}
    assert len(stats["custom_ids_succeeded"]) == 48


async def test_sync_and_batch_answers_agree(client: AsyncOpenAI) -> None:
    line = chat_line("same", NOTE, response_format=JSON_SCHEMA_FORMAT)
    sync = await client.chat.completions.create(**line["body"])
    batch = await wait_terminal(client, (await submit(client, [line])).id)
    [output] = await read_lines(client, batch.output_file_id)
    assert output["response"]["body"]["choices"][0]["message"]["content"] == sync.choices[0].message.content


async def test_embeddings_batch(client: AsyncOpenAI) -> None:
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"text {i}"},
        }  # fmt: skip
        for i in range(5)
    ]
    batch = await wait_terminal(client, (await submit(client, lines, endpoint="/v1/embeddings")).id)
    assert batch.status == "completed" and batch.error_file_id is None
    outputs = await read_lines(client, batch.output_file_id)
    assert len(outputs[0]["response"]["body"]["data"][0]["embedding"]) == 1536


async def test_validation_failures(emulator: Emulator, client: AsyncOpenAI) -> None:
    duplicate = await submit(client, [chat_line("a", "x"), chat_line("a", "y")])
    failed = await wait_terminal(client, duplicate.id)
    assert failed.status == "failed" and failed.failed_at and failed.in_progress_at is None
    assert failed.errors and failed.errors.data and failed.errors.data[0].code == "duplicate_custom_id"
    assert failed.errors.data[0].line == 2
    assert failed.output_file_id is None and failed.error_file_id is None

    emulator.set_faults(FaultConfig(batch_fail_validation=True))
    forced = await wait_terminal(client, (await submit(client, [chat_line("b", "x")])).id)
    assert forced.status == "failed" and forced.errors and forced.errors.data
    assert forced.errors.data[0].code == "invalid_json_line"

    with pytest.raises(openai.BadRequestError) as unknown_file:
        await client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert "Cannot find file file-nope" in unknown_file.value.message


async def test_expired_batch_keeps_partial_output_and_next_batch_succeeds(
    emulator: Emulator, client: AsyncOpenAI
) -> None:
    emulator.set_faults(FaultConfig(batch_faults_next=["expire", "none"], batch_expire_fraction=0.4))
    lines = [chat_line(f"x{i}", f"note {i}") for i in range(10)]
    expired = await wait_terminal(client, (await submit(client, lines)).id)
    assert expired.status == "expired" and expired.expired_at
    outputs = await read_lines(client, expired.output_file_id)
    failures = await read_lines(client, expired.error_file_id)
    assert len(outputs) == 4 and len(failures) == 6
    assert {f["error"]["code"] for f in failures} == {"batch_expired"}
    assert all(f["response"] is None for f in failures)
    assert {line["custom_id"] for line in outputs + failures} == {line["custom_id"] for line in lines}
    following = await wait_terminal(client, (await submit(client, lines)).id)
    assert following.status == "completed"


async def test_enqueued_token_limit(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(enqueued_token_limit=10))
    batch = await wait_terminal(client, (await submit(client, [chat_line("t", NOTE)])).id)
    assert batch.status == "failed" and batch.errors and batch.errors.data
    error = batch.errors.data[0]
    assert error.code == "token_limit_exceeded" and error.line is None
    assert error.message and error.message.startswith("Enqueued token limit reached for gpt-4o-mini")
    emulator.set_faults(FaultConfig(batch_faults_next=["token_limit"]))
    forced = await wait_terminal(client, (await submit(client, [chat_line("t", "x")])).id)
    assert forced.errors and forced.errors.data and forced.errors.data[0].code == "token_limit_exceeded"


async def test_cancel_keeps_partial_output(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(batch_delay_s=3.0))
    lines = [chat_line(f"c{i}", f"note {i}") for i in range(40)]
    created = await submit(client, lines)
    await wait_for(client, created.id, lambda b: bool(b.request_counts and b.request_counts.completed))
    cancelling = await client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    cancelled = await wait_terminal(client, created.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    outputs = await read_lines(client, cancelled.output_file_id)
    failures = await read_lines(client, cancelled.error_file_id)
    assert 0 < len(outputs) < 40 and len(outputs) + len(failures) == 40
    assert {f["error"]["code"] for f in failures} == {"batch_cancelled"}
    with pytest.raises(openai.BadRequestError):
        await client.batches.cancel(created.id)


async def test_provider_side_cancel_fault(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(batch_faults_next=["cancel"]))
    batch = await wait_terminal(
        client, (await submit(client, [chat_line(f"p{i}", "x") for i in range(10)])).id
    )
    assert batch.status == "cancelled" and batch.request_counts
    assert batch.request_counts.completed == 5


async def test_batch_list_pagination(client: AsyncOpenAI) -> None:
    uploaded = await client.files.create(
        file=("b.jsonl", jsonl([chat_line("a", "x")]), "application/jsonl"), purpose="batch"
    )
    created = []
    for i in range(5):
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"n": str(i)},
        )
        created.append(batch.id)
    first_page = await client.batches.list(limit=2)
    assert [b.id for b in first_page.data] == created[::-1][:2]
    assert first_page.has_more
    assert [b.id async for b in client.batches.list(limit=2)] == created[::-1]
    assert first_page.data[0].metadata == {"n": "4"}


async def test_create_validation(client: AsyncOpenAI) -> None:
    uploaded = await client.files.create(
        file=("b.jsonl", jsonl([chat_line("a", "x")]), "application/jsonl"), purpose="batch"
    )
    bad: list[dict[str, Any]] = [
        {"completion_window": "48h"},
        {"endpoint": "/v1/nope"},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"metadata": {"k": "v" * 513}},
    ]
    for override in bad:
        params: dict[str, Any] = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions"}
        params = {**params, "completion_window": "24h", **override}
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(**params)


async def test_empty_string_file_ids_and_create_500(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(empty_string_file_ids=True, batch_faults_next=["none", "create_500"]))
    created = await submit(client, [chat_line("a", "x")])
    assert created.output_file_id == "" and created.error_file_id == ""
    done = await wait_terminal(client, created.id)
    assert done.output_file_id and done.error_file_id == ""
    with pytest.raises(openai.InternalServerError):
        await submit(client, [chat_line("b", "x")])
    listed = [b async for b in client.batches.list()]
    assert len(listed) == 2  # the "failed" create really created a batch
    assert emulator.stats["batches_created"] == 2


async def test_admin_endpoints_over_http(emulator: Emulator) -> None:
    root = emulator.base_url.removesuffix("/v1")
    async with AsyncOpenAI(base_url=root, api_key=API_KEY, max_retries=0) as admin:
        current = await admin.post("/_emulator/faults", body={"script": [503]}, cast_to=dict)
        assert current["script"] == [503]
        with pytest.raises(openai.BadRequestError):
            await admin.post("/_emulator/faults", body={"rate_429": 2}, cast_to=dict)
        async with AsyncOpenAI(base_url=emulator.base_url, api_key=API_KEY, max_retries=0) as sdk:
            with pytest.raises(openai.InternalServerError):
                await sdk.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
        stats = await admin.get("/_emulator/stats", cast_to=dict)
        assert stats["status_counts"] == {"503": 1}
        await admin.post("/_emulator/reset", cast_to=dict)
        assert (await admin.get("/_emulator/stats", cast_to=dict))["requests"] == {}


async def test_line_errors_and_stuck_finalizing(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(batch_line_error_rate=0.5, batch_stuck_finalizing_s=0.5))
    created = await submit(client, [chat_line(f"l{i}", f"note {i}") for i in range(20)])
    finalizing = await wait_for(client, created.id, lambda b: b.status in TERMINAL | {"finalizing"})
    assert finalizing.status == "finalizing" and finalizing.finalizing_at
    batch = await wait_terminal(client, created.id)
    assert batch.status == "completed" and batch.request_counts
    failures = await read_lines(client, batch.error_file_id)
    assert 0 < len(failures) == batch.request_counts.failed < 20
    assert {f["response"]["status_code"] for f in failures} == {500}


async def test_latency_is_added(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(latency_s=0.3))
    started = asyncio.get_running_loop().time()
    await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert asyncio.get_running_loop().time() - started >= 0.3
