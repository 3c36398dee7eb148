"""Drives each batch through its lifecycle in a background asyncio task.

Timing: ``batch_delay_s`` is split 1/5 validating, 3/5 in_progress (spread over the
chunks, so ``request_counts`` grow live), 1/5 finalizing (+ ``batch_stuck_finalizing_s``).
CPU-bound work (JSON parsing, token counting, synthesis) runs in worker threads in
chunks, so the event loop, and thus the HTTP API, stays responsive on 50,000-line files.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

from .batch_input import InputSummary, batch_error, validate_batch_input
from .batch_output import (
    CANCELLED_MESSAGE,
    EXPIRED_MESSAGE,
    LineResult,
    custom_id_of,
    failure_line,
    run_lines,
)
from .batches import BatchRecord, request_cancel, transition
from .faults import BatchFaultPlan
from .state import EmulatorState
from .synth import seeded_random

logger = logging.getLogger("enrichd.emulator")

MAX_CHUNK_LINES = 250
PROGRESS_STEPS = 10


@dataclass
class _Results:
    outputs: list[bytes] = field(default_factory=list)
    failures: list[bytes] = field(default_factory=list)


class BatchRunner:
    """Owns one task per live batch; :meth:`close` cancels them all."""

    def __init__(self, state: EmulatorState) -> None:
        self._state = state
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}

    def launch(self, batch: BatchRecord, plan: BatchFaultPlan, data: bytes) -> None:
        """Start processing ``batch`` (input ``data`` captured now, so deleting the file is harmless)."""
        self._wake[batch.id] = asyncio.Event()
        task = asyncio.create_task(self._run(batch, plan, data), name=f"emulator-batch-{batch.id}")
        self._tasks[batch.id] = task

    def cancel(self, batch: BatchRecord) -> None:
        """Handle ``POST /v1/batches/{id}/cancel``."""
        request_cancel(batch, self._state.now())
        event = self._wake.get(batch.id)
        if event is not None:
            event.set()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, batch: BatchRecord, plan: BatchFaultPlan, data: bytes) -> None:
        try:
            await self._lifecycle(batch, plan, data)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Keep the batch observable as a realistic failure instead of hanging in a live status.
            logger.exception("batch %s crashed in the emulator", batch.id)
            batch.errors = [batch_error("server_error", "The batch failed due to an internal error.")]
            transition(batch, "failed", self._state.now())
        finally:
            self._tasks.pop(batch.id, None)
            self._wake.pop(batch.id, None)

    async def _pause(self, batch: BatchRecord, seconds: float) -> None:
        """Sleep, waking early when the batch is cancelled."""
        event = self._wake.get(batch.id)
        if seconds <= 0 or event is None:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _lifecycle(self, batch: BatchRecord, plan: BatchFaultPlan, data: bytes) -> None:
        state = self._state
        phase_s = state.batch_delay_s / 5
        limit = state.enqueued_token_limit
        summary = await asyncio.to_thread(
            validate_batch_input,
            data,
            batch.endpoint,
            max_lines=state.config.max_batch_lines,
            unknown_models=state.unknown_models,
            count_tokens=limit is not None,
        )
        state.stats.batch_lines_total += len(summary.spans)
        state.stats.custom_ids_submitted.update(summary.custom_ids)
        await self._pause(batch, phase_s)
        if batch.cancel_requested:
            transition(batch, "cancelled", state.now())
            return
        batch.model = summary.model
        if self._validation_failed(batch, plan, summary, limit):
            transition(batch, "failed", state.now())
            return
        batch.enqueued_tokens = summary.prompt_tokens
        batch.total = len(summary.spans)
        transition(batch, "in_progress", state.now())
        results, outcome = await self._process(batch, plan, data, summary, phase_s * 3)
        if outcome == "completed":
            transition(batch, "finalizing", state.now())
            await self._pause(batch, phase_s + plan.stuck_finalizing_s)
            if batch.cancel_requested:
                outcome = "cancelled"
        elif outcome == "cancelled":
            await state.sleep(min(phase_s / 2, 1.0))  # in-flight requests finishing
        self._write_files(batch, results)
        if plan.output_404:
            # The batch names its files, but the provider lost them: content answers 404.
            state.stats.faults_injected["batch_output_404"] += 1
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id is not None:
                    state.files.delete(file_id)
        transition(batch, outcome, state.now())

    def _validation_failed(
        self, batch: BatchRecord, plan: BatchFaultPlan, summary: InputSummary, limit: int | None
    ) -> bool:
        if summary.errors:
            batch.errors = summary.errors
            return True
        if plan.fail_validation:
            batch.errors = [
                batch_error("invalid_json_line", "This line is not parseable as valid JSON.", line=1)
            ]
            return True
        model = summary.model or "unknown"
        over = (
            limit is not None and self._state.batches.enqueued_tokens(model) + summary.prompt_tokens > limit
        )
        if plan.token_limit or over:
            shown = limit if limit is not None else 90_000
            org = self._state.config.organization
            message = (
                f"Enqueued token limit reached for {model} in organization {org}. "
                f"Limit: {shown:,} enqueued tokens. Please try again once some in_progress batches have "
                "been completed."
            )
            batch.errors = [batch_error("token_limit_exceeded", message)]
            return True
        return False

    async def _process(
        self, batch: BatchRecord, plan: BatchFaultPlan, data: bytes, summary: InputSummary, duration_s: float
    ) -> tuple[_Results, str]:
        state = self._state
        spans = summary.spans
        count = len(spans)
        rng = seeded_random("batch", str(state.config.seed), str(batch.seq))
        order = list(range(count))
        rng.shuffle(order)
        if count > 1 and order == sorted(order):
            order = order[1:] + order[:1]  # never the input order
        stop_at = round(count * plan.expire_fraction) if plan.expire else count
        cancel_at = count // 2 if plan.cancel_midway else None
        chunk = max(1, min(MAX_CHUNK_LINES, math.ceil(count / PROGRESS_STEPS)))
        step_pause_s = duration_s / max(1, math.ceil(stop_at / chunk))
        results = _Results()
        position = 0
        while position < stop_at and not batch.cancel_requested:
            if cancel_at is not None and position >= cancel_at:
                self.cancel(batch)  # the provider cancels it: same path as a user's cancel
                break
            part = order[position : min(position + chunk, stop_at)]
            lines = [data[spans[i][1] : spans[i][2]] for i in part]
            draws = [rng.random() for _ in part]
            chunk_results = await asyncio.to_thread(
                run_lines,
                lines,
                draws,
                batch.endpoint,
                state.answer_context(batch=True),
                unknown_models=state.unknown_models,
                line_error_rate=plan.line_error_rate,
            )
            for result in chunk_results:
                self._record(batch, result)
                (results.outputs if result.ok else results.failures).append(result.line)
            position += len(part)
            await self._pause(batch, step_pause_s)
        if position >= count and not plan.expire:
            return results, "completed"
        code, message, outcome = (
            ("batch_cancelled", CANCELLED_MESSAGE, "cancelled")
            if batch.cancel_requested
            else ("batch_expired", EXPIRED_MESSAGE, "expired")
        )
        for index in order[position:]:
            custom_id = custom_id_of(data[spans[index][1] : spans[index][2]])
            results.failures.append(failure_line(custom_id, code, message))
            batch.failed += 1
        return results, outcome

    def _record(self, batch: BatchRecord, result: LineResult) -> None:
        stats = self._state.stats
        if result.model is not None:
            stats.batch_lines_by_model[result.model] += 1
        if result.ok:
            batch.completed += 1
            batch.input_tokens += result.prompt_tokens
            batch.output_tokens += result.completion_tokens
            stats.custom_ids_succeeded[result.custom_id] += 1
            if result.prompt is not None:
                stats.prompts[result.prompt] += 1
            stats.tokens_in += result.prompt_tokens
            stats.tokens_out += result.completion_tokens
            stats.record_chat_answer(
                cached_tokens=result.cached_tokens,
                packed_items=result.packed_items,
                pack_dropped=result.pack_dropped,
                is_pack=result.is_pack,
            )
        else:
            batch.failed += 1

    def _write_files(self, batch: BatchRecord, results: _Results) -> None:
        state = self._state
        now = state.now()
        expiry = batch.output_expires_after_s
        if results.outputs:
            data = b"\n".join(results.outputs) + b"\n"
            record = state.files.add(
                f"{batch.id}_output.jsonl", "batch_output", data, now=now, expires_after_s=expiry
            )
            batch.output_file_id = record.id
        if results.failures:
            data = b"\n".join(results.failures) + b"\n"
            record = state.files.add(
                f"{batch.id}_error.jsonl", "batch_output", data, now=now, expires_after_s=expiry
            )
            batch.error_file_id = record.id
