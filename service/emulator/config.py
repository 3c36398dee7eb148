"""Configuration of the emulator and of the faults it injects (pydantic models).

Both models forbid unknown fields so that a typo in a test (``rate429=1``) fails loudly
instead of silently injecting nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

BatchFault = Literal[
    "none", "expire", "fail_validation", "token_limit", "cancel", "create_500", "forget", "output_404"
]
"""One entry of :attr:`FaultConfig.batch_faults_next`, applied to a single created batch.

- ``none``: no extra fault for that batch (use it to skip a position in the list).
- ``expire``: the batch expires after part of its lines ran (see ``batch_expire_fraction``).
- ``fail_validation``: the batch fails validation with ``invalid_json_line``.
- ``token_limit``: the batch fails with ``token_limit_exceeded``.
- ``cancel``: the provider cancels the batch half-way through ``in_progress``.
- ``create_500``: the batch is created but the create call answers HTTP 500.
- ``forget``: the create call answers normally, then the provider forgets the batch: it
  never runs, is not listed, and retrieving or cancelling it answers 404.
- ``output_404``: the batch runs and completes, but its output and error files are gone:
  their content (and retrieve) answers 404 ``No such File object``.
"""

Fraction = Field(default=0.0, ge=0.0, le=1.0)


class FaultConfig(BaseModel):
    """Faults to inject; replace them at run time with ``Emulator.set_faults``.

    Sync faults (chat completions and embeddings) are decided per request, in this order:
    the next ``script`` entry if any, else one seeded random draw against ``rate_timeout``,
    ``rate_429``, ``rate_500`` and ``rate_503`` (cumulative, so their sum must be <= 1).
    Setting faults re-seeds the random source, so a fault sequence is reproducible.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- sync endpoints -------------------------------------------------------------
    rate_429: float = Fraction
    rate_500: float = Fraction
    rate_503: float = Fraction
    rate_timeout: float = Fraction
    timeout_sleep_s: float = Field(default=30.0, ge=0.0)
    latency_s: float = Field(default=0.0, ge=0.0)
    retry_after_s: float = Field(default=1.0, ge=0.0)
    script: list[int] = Field(default_factory=list)
    """Statuses for the next sync requests, one consumed per request: 0 = normal,
    -1 = timeout (sleep ``timeout_sleep_s``), any other value = that HTTP error."""
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)

    # --- flex processing (service_tier "flex", sync chat completions) -------------------
    flex_latency_s: float = Field(default=0.05, ge=0.0)
    """Added before every flex answer (on top of ``latency_s``): flex is slower."""
    flex_unavailable_rate: float = Fraction
    """Fraction of flex requests refused with 429 ``resource_unavailable`` (own seeded draw,
    one per flex request that passed validation, so other fault sequences do not shift)."""
    flex_unavailable_next: int = Field(default=0, ge=0)
    """The next N flex requests are refused (one-shot, before ``flex_unavailable_rate``)."""
    flex_retry_after_s: float | None = Field(default=None, ge=0.0)
    """``retry-after`` on flex refusals; None = no ``retry-after`` header."""

    # --- packed prompts (several items, one answer keyed by id) ------------------------
    pack_drop: int = Field(default=0, ge=0)
    """Every packed answer omits its last N answers (ids in prompt order)."""
    pack_drop_next: list[int] = Field(default_factory=list)
    """One-shot drop counts, one consumed per packed request (sync or batch line), used
    instead of ``pack_drop`` while entries remain."""

    # --- batches --------------------------------------------------------------------
    batch_fail_validation: bool = False
    batch_expire: bool = False
    batch_expire_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    batch_line_error_rate: float = Fraction
    batch_stuck_finalizing_s: float = Field(default=0.0, ge=0.0)
    enqueued_token_limit: int | None = Field(default=None, ge=0)
    batch_delay_s: float | None = Field(default=None, ge=0.0)
    batch_create_500_after_create: bool = False
    batch_create_latency_s: float = Field(default=0.0, ge=0.0)
    """Seconds before ``POST /v1/batches`` creates the batch and answers (the real API can
    take seconds; until then the batch is not listed)."""
    file_upload_latency_s: float = Field(default=0.0, ge=0.0)
    """Seconds before ``POST /v1/files`` answers (a large file over a slow link)."""
    file_upload_status: int | None = Field(default=None, ge=400, le=599)
    """Every ``POST /v1/files`` answers this HTTP error (e.g. 401 ``invalid_api_key``: a key
    that may not upload), with the same envelope as a ``status`` marker."""
    empty_string_file_ids: bool = False
    batch_faults_next: list[BatchFault] = Field(default_factory=list)

    @field_validator("script")
    @classmethod
    def _script_entries_are_statuses(cls, script: list[int]) -> list[int]:
        for entry in script:
            if entry not in (0, -1) and not 400 <= entry <= 599:
                raise ValueError(f"script entries must be 0, -1 or an HTTP error status 400-599, got {entry}")
        return script

    @model_validator(mode="after")
    def _rates_sum_to_at_most_one(self) -> FaultConfig:
        total = self.rate_429 + self.rate_500 + self.rate_503 + self.rate_timeout
        if total > 1.0 + 1e-9:
            raise ValueError(f"rate_429 + rate_500 + rate_503 + rate_timeout must be <= 1, got {total:g}")
        return self


class EmulatorConfig(BaseModel):
    """Static settings of one emulator instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: SecretStr | None = None
    """When set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``."""
    seed: int = 0
    """Seeds generated content, fault draws and output-line shuffling."""
    batch_delay_s: float = Field(default=2.0, ge=0.0)
    """Total time a batch spends in validating + in_progress + finalizing."""
    context_window: int = Field(default=128_000, ge=1)
    max_output_tokens: int = Field(default=16_384, ge=1)
    """Largest ``max_tokens`` a chat request may ask for (gpt-4o-mini's value)."""
    unknown_models: list[str] = Field(default_factory=list)
    """Model names answered with 404 ``model_not_found``; every other name is accepted."""
    enqueued_token_limit: int | None = Field(default=None, ge=0)
    """Per-model cap on prompt tokens of non-terminal batches; None = unlimited."""
    max_batch_lines: int = Field(default=50_000, ge=1)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    organization: str = "org-emulator"
    flex_models: list[str] | None = None
    """Models that accept ``service_tier: "flex"``; None = every model. A flex request for
    another model gets 400 ``unsupported_value`` (``param: "service_tier"``)."""
    prompt_caching: bool = True
    """Report ``usage.prompt_tokens_details.cached_tokens`` like OpenAI's automatic caching."""
    prompt_cache_ttl_s: float = Field(default=600.0, gt=0.0)
    """How long (emulator clock) a cached prefix stays usable after it was last seen."""
    prompt_cache_max_entries: int = Field(default=200_000, ge=1)
    """LRU cap on stored prefix hashes (one per 1,024 + 128·k boundary of a prompt)."""
    faults: FaultConfig = Field(default_factory=FaultConfig)
    """Faults active from the start."""
