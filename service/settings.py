"""Settings (CONTRACT §9): one pydantic-settings model, the only code that reads the
environment. Sources, first wins: ``ENRICHD_*`` variables, then ``OPENAI_API_KEY`` /
``OPENAI_BASE_URL`` / ``STATE_DIRECTORY`` (systemd), then the TOML file."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from handlers import HandlerConfigError, HandlerSpec, build_registry
from service.core.cost import Price, supports_flex
from service.core.digest_spec import DigestConfigError, DigestSettings, parse_digests
from service.core.digests import FIELDS as DIGEST_FIELDS
from service.core.pipelines import PipelineConfigError, PipelineSpec, build_pipelines, referenced_handlers
from service.core.redact import url_secrets

DEFAULT_CONFIG = Path("config/enrichd.toml")
_toml_path: ContextVar[Path | None] = ContextVar("enrichd_toml_path", default=None)


class ConfigError(Exception):
    """Start-up stops with this: one message that names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NatsSettings(_Section):
    url: str | None = None
    subject_prefix: str = Field("enrich", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    embedded_port: int = Field(4222, ge=0, le=65535)
    stream_replicas: int = Field(1, ge=1, le=5)
    consumer: str = Field("enrichd", pattern=r"^[A-Za-z0-9_-]+$")
    ack_wait_s: float = Field(60.0, gt=0)
    max_deliver: int = Field(10, ge=1)
    result_dedup_window_s: float = Field(3600.0, gt=0)

    @property
    def embedded(self) -> bool:
        return not self.url


class OpenAISettings(_Section):
    base_url: str | None = None
    api_key: SecretStr | None = None
    organization: str | None = None
    project: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    max_concurrency: int = Field(16, ge=1, le=1024)
    chat_model: str = "gpt-4o-mini"
    embedding_model: str = "text-embedding-3-small"
    max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"

    @property
    def use_emulator(self) -> bool:
        return self.api_key is None and not self.base_url


class FolderSettings(_Section):
    inbox: Path = Path("./inbox")
    outbox: Path = Path("./outbox")
    default_handler: str = "summarize"
    default_priority: Literal["urgent", "high", "normal", "low"] = "normal"
    settle_s: float = Field(1.0, ge=0)
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    enabled: bool = True


class BatchingSettings(_Section):
    max_items: int = Field(50_000, ge=1, le=50_000)
    max_bytes: int = Field(190_000_000, ge=1024, le=200_000_000)
    max_wait_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(30.0, gt=0)
    max_latency_s: float = Field(86_400.0, gt=0)
    windows: list[str] = Field(default_factory=list)
    max_enqueued_tokens: int | None = Field(None, ge=1)
    results_chunk: int = Field(1000, ge=1, le=50_000)
    flush_ack_wait_s: float = Field(120.0, gt=0)
    lease_s: float = Field(120.0, gt=0)
    give_up_after_s: float = Field(3600.0, ge=0)


class RoutingSettings(_Section):
    sync_priorities: list[Literal["urgent", "high", "normal", "low"]] = ["urgent", "high"]
    # CONTRACT §11: deadline work the batch path cannot meet goes flex (where the model
    # has a flex price) instead of sync; items waiting for a batch whose deadline comes
    # within promote_margin_s are answered on the cheapest route that still meets it.
    flex: bool = False
    promote_margin_s: float = Field(900.0, ge=0)
    # How long a flex call may take before it counts as failed (flex is slower than sync).
    flex_timeout_s: float = Field(900.0, gt=0)


class PackingSettings(_Section):
    """How packs (handler key ``pack``, docs/packing.md) are made."""

    # How long an urgent item of a packing handler waits for others to share its request.
    linger_s: float = Field(0.03, ge=0, le=1.0)
    # The models' limits a pack must fit: prompt + requested output within the context
    # window, and the pack's max output tokens at most this (gpt-4o-mini's).
    context_tokens: int = Field(128_000, ge=1024)
    max_output_tokens: int = Field(16_384, ge=16)


class TelemetrySettings(_Section):
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class LimitSettings(_Section):
    max_item_bytes: int = Field(1024 * 1024, ge=64)


class ResultSettings(_Section):
    ttl_s: float = Field(7 * 86_400.0, gt=0)


class RetrySettings(_Section):
    # Sync calls: a transient failure is retried until max_elapsed_s after the first call
    # (the time budget) or the item's deadline, at most max_attempts calls. Batch lines:
    # a line that failed transiently goes into up to max_attempts batches.
    max_attempts: int = Field(10, ge=1, le=50)
    base_s: float = Field(0.5, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)
    max_elapsed_s: float = Field(60.0, gt=0)


class PriceSettings(_Section):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)  # unset: as input_per_mtok
    flex: bool = False  # the model takes service_tier "flex" (billed at batch rates)


def _default_prices() -> dict[str, PriceSettings]:
    # USD per million tokens, standard tier, as published by OpenAI (2025-2026): input,
    # output, cached input, and whether flex processing is offered for the model.
    table: dict[str, tuple[float, float, float | None, bool]] = {
        "gpt-4o-mini": (0.15, 0.60, 0.075, False),
        "gpt-4o": (2.50, 10.00, 1.25, False),
        "gpt-4.1-mini": (0.40, 1.60, 0.10, False),
        "gpt-4.1-nano": (0.10, 0.40, 0.025, False),
        "gpt-4.1": (2.00, 8.00, 0.50, False),
        "gpt-5": (1.25, 10.00, 0.125, True),
        "gpt-5-mini": (0.25, 2.00, 0.025, True),
        "gpt-5-nano": (0.05, 0.40, 0.005, True),
        "o3": (2.00, 8.00, 0.50, True),
        "o4-mini": (1.10, 4.40, 0.275, True),
        "text-embedding-3-small": (0.02, 0.0, None, False),
        "text-embedding-3-large": (0.13, 0.0, None, False),
    }
    return {
        k: PriceSettings(input_per_mtok=i, output_per_mtok=o, cached_input_per_mtok=c, flex=f)
        for k, (i, o, c, f) in table.items()
    }


class RateLimitSettings(_Section):
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    burst_s: float = Field(1.0, gt=0, le=60)
    headroom: float = Field(0.04, ge=0, lt=0.5)


class BudgetSettings(_Section):
    daily_usd: float | None = Field(None, gt=0)
    handlers: dict[str, float] = Field(default_factory=dict)
    recheck_s: float = Field(60.0, gt=0)


class AlertSettings(_Section):
    failure_rate: float = Field(0.05, gt=0, le=1)
    retry_budget: float = Field(0.2, gt=0)
    window_s: float = Field(300.0, gt=0)
    min_items: int = Field(20, ge=1)
    batch_sla_s: float = Field(24 * 3600.0, gt=0)
    cooldown_s: float = Field(900.0, ge=0)


class EmulatorSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    batch_delay_s: float = Field(5.0, ge=0)


class ShutdownSettings(_Section):
    grace_s: float = Field(20.0, gt=0)


class Settings(BaseSettings):
    """All of enrichd's settings. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="ENRICHD_",
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,
        nested_model_default_partial_update=True,
    )

    state_dir: Path = Path("./var")
    instance_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    nats: NatsSettings = NatsSettings()
    openai: OpenAISettings = OpenAISettings()
    folders: FolderSettings = FolderSettings()
    batching: BatchingSettings = BatchingSettings()
    routing: RoutingSettings = RoutingSettings()
    packing: PackingSettings = PackingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    limits: LimitSettings = LimitSettings()
    results: ResultSettings = ResultSettings()
    retry: RetrySettings = RetrySettings()
    emulator: EmulatorSettings = EmulatorSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    batch_discount: float = Field(0.5, ge=0, lt=1)
    prices: dict[str, PriceSettings] = Field(default_factory=_default_prices)
    handlers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # [pipelines.<name>] (CONTRACT §14): validated with the handlers, see _check_handlers
    pipelines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # [digests] timezone and [digests.<name>] (CONTRACT §15)
    digests: dict[str, Any] = Field(default_factory=dict)
    rate_limits: dict[str, RateLimitSettings] = Field(default_factory=dict)
    budget: BudgetSettings = BudgetSettings()
    alerts: AlertSettings = AlertSettings()
    rate_limit_urgent_reserve: float = Field(0.1, ge=0, lt=1)
    _registry: dict[str, HandlerSpec] = PrivateAttr(default_factory=dict)
    _pipelines: dict[str, PipelineSpec] = PrivateAttr(default_factory=dict)
    _digests: DigestSettings = PrivateAttr(default_factory=DigestSettings)

    @field_validator("prices", mode="after")
    @classmethod
    def _merge_prices(cls, value: dict[str, PriceSettings]) -> dict[str, PriceSettings]:
        return {**_default_prices(), **value}

    @model_validator(mode="after")
    def _check_handlers(self) -> Settings:
        try:
            self._registry = build_registry(
                self.handlers,
                chat_model=self.openai.chat_model,
                embedding_model=self.openai.embedding_model,
                step_handlers=referenced_handlers(self.pipelines),
            )
            self._pipelines = build_pipelines(self.pipelines, self._registry)
        except (HandlerConfigError, PipelineConfigError) as exc:
            raise ValueError(str(exc)) from None
        prices = self.price_table
        for name, spec in self._registry.items():
            if spec.flex and not supports_flex(spec.model, prices):
                raise ValueError(
                    f"handlers.{name}.flex: model {spec.model!r} has no flex price "
                    f"(set prices.{spec.model}.flex = true if the provider offers flex for it)"
                )
        return self

    @model_validator(mode="after")
    def _check_digests(self) -> Settings:
        """[digests] (CONTRACT §15) into typed specs; their handlers' templates may name
        only the digest fields (service/core/digests.FIELDS) and ``text``."""
        chat = {name: not spec.is_embedding for name, spec in self._registry.items()}
        try:
            parsed = parse_digests(self.digests, tz_of=ZoneInfo, handlers=chat, pipelines=set(self.pipelines))
        except DigestConfigError as exc:
            raise ValueError(str(exc)) from None
        for spec in parsed.specs:
            extra = sorted(self._registry[spec.handler].template.required_fields - {*DIGEST_FIELDS, "text"})
            if extra:
                raise ValueError(
                    f"digests.{spec.name}.handler: {spec.handler!r} needs field(s) {', '.join(extra)}, "
                    f"which a digest does not give (it gives {', '.join(DIGEST_FIELDS)} and text)"
                )
        self._digests = parsed
        return self

    @property
    def registry(self) -> dict[str, HandlerSpec]:
        return self._registry

    @property
    def pipeline_specs(self) -> dict[str, PipelineSpec]:
        """The checked ``[pipelines.<name>]`` (service/core/chain.py)."""
        return self._pipelines

    @property
    def digest_specs(self) -> DigestSettings:
        """The validated [digests] (service/core/digest_spec.py)."""
        return self._digests

    @property
    def instance(self) -> str:
        """This replica's identity in batch leases: stable across restarts of one
        installation (host + state dir), distinct between replicas."""
        if self.instance_id:
            return self.instance_id
        import hashlib
        import socket

        digest = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:8]
        host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
        return f"{host}-{digest}"

    @property
    def price_table(self) -> dict[str, Price]:
        return {
            k: Price(v.input_per_mtok, v.output_per_mtok, v.cached_input_per_mtok, v.flex)
            for k, v in self.prices.items()
        }

    def secrets(self) -> list[str]:
        """Every secret value, so logs and events can be scrubbed of them."""

        values = [self.openai.api_key, self.nats.password, self.nats.token]
        found = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        return found + url_secrets(self.nats.url)  # a password written inside nats.url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            _FallbackEnvSource(settings_cls),
        ]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


class _FallbackEnvSource(PydanticBaseSettingsSource):
    """The conventional variables other tools use: OPENAI_API_KEY, OPENAI_BASE_URL and
    systemd's STATE_DIRECTORY. ENRICHD_* variables win over these."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        openai: dict[str, Any] = {}
        if os.environ.get("OPENAI_API_KEY"):
            openai["api_key"] = os.environ["OPENAI_API_KEY"]
        if os.environ.get("OPENAI_BASE_URL"):
            openai["base_url"] = os.environ["OPENAI_BASE_URL"]
        if openai:
            out["openai"] = openai
        state = os.environ.get("STATE_DIRECTORY")
        if state:
            out["state_dir"] = state.split(":")[0]
        return out


def config_path(explicit: Path | None) -> Path | None:
    """``--config``, else ``ENRICHD_CONFIG``, else ``config/enrichd.toml`` when present."""
    if explicit is not None:
        return explicit
    env = os.environ.get("ENRICHD_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(explicit: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once, at start. Raises :class:`ConfigError` naming the key."""
    path = config_path(explicit)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _toml_path.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        _toml_path.reset(token)


def _describe(exc: ValidationError, path: Path | None) -> str:
    first = exc.errors(include_url=False)[0]
    key = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    where = f" (in {path} or ENRICHD_* environment)" if path else " (in ENRICHD_* environment)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if not key:
        return f"invalid configuration{where}: {message}{more}"
    return f"invalid setting {key}{where}: {message}{more}"
