"""Settings: TOML + ENRICHD_ env, fallbacks, and one clear message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("ENRICHD_", "OPENAI_")) or key == "STATE_DIRECTORY":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "enrichd.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    assert s.nats.url is None and s.nats.embedded
    assert s.openai.use_emulator
    assert s.state_dir == Path("./var")
    assert s.folders.inbox == Path("./inbox") and s.folders.outbox == Path("./outbox")
    b = s.batching
    assert (b.max_items, b.max_bytes, b.max_wait_s, b.poll_interval_s, b.max_latency_s) == (
        50000,
        190000000,
        600,
        30,
        86400,
    )
    assert s.routing.sync_priorities == ["urgent", "high"]
    assert s.telemetry.metrics_port == 9464
    assert s.limits.max_item_bytes == 1024 * 1024
    assert s.results.ttl_s == 7 * 86400


def test_env_overrides_toml_and_nested_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[batching]\nmax_items = 100\nmax_wait_s = 5\n[nats]\nurl = "nats://a:4222"\n')
    monkeypatch.setenv("ENRICHD_BATCHING__MAX_ITEMS", "200")
    monkeypatch.setenv("ENRICHD_ROUTING__SYNC_PRIORITIES", '["urgent"]')
    s = load_settings(path)
    assert s.batching.max_items == 200 and s.batching.max_wait_s == 5
    assert s.nats.url == "nats://a:4222"
    assert s.routing.sync_priorities == ["urgent"]


def test_config_from_env_var_and_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "enrichd.toml").write_text("[batching]\nmax_items = 7\n")
    assert load_settings().batching.max_items == 7
    other = write(tmp_path, "[batching]\nmax_items = 9\n")
    monkeypatch.setenv("ENRICHD_CONFIG", str(other))
    assert load_settings().batching.max_items == 9


def test_openai_conventional_env_and_systemd_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-1234567890")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/enrichd")
    s = load_settings()
    assert s.openai.api_key is not None and s.openai.api_key.get_secret_value() == "sk-test-1234567890"
    assert not s.openai.use_emulator
    assert s.state_dir == Path("/var/lib/enrichd")
    assert "sk-test" not in repr(s) and "sk-test" not in str(s.model_dump())
    monkeypatch.setenv("ENRICHD_OPENAI__API_KEY", "sk-override-000")
    assert load_settings().openai.api_key.get_secret_value() == "sk-override-000"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[batching]\nmax_items = 60000\n", "batching.max_items"),
        ("[batching]\nmax_bytes = 300000000\n", "batching.max_bytes"),
        ("[batching]\nmax_wait_s = -1\n", "batching.max_wait_s"),
        ("[nats]\nurll = 'x'\n", "nats.urll"),
        ("[routing]\nsync_priorities = ['soon']\n", "routing.sync_priorities"),
        ("[telemetry]\nmetrics_port = 70000\n", "telemetry.metrics_port"),
        ("[handlers.gist]\nprompt = '{text'\n", "handlers.gist.prompt"),
        ("[packing]\nlinger_s = 5\n", "packing.linger_s"),
        ("[packing]\nmax_output_tokens = 0\n", "packing.max_output_tokens"),
        # the second wave (CONTRACT §11-§13)
        ("[handlers.tags]\npack = 0\n", "handlers.tags.pack"),
        ("[routing]\npromote_margin_s = -1\n", "routing.promote_margin_s"),
        ("[handlers.tags]\nflex = true\n", "handlers.tags.flex"),  # gpt-4o-mini has no flex price
        ("[prices.gpt-4o-mini]\ninput_per_mtok = 1\nflex = 'maybe'\n", "prices.gpt-4o-mini.flex"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, toml))
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_secret_never_in_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICHD_OPENAI__API_KEY", "sk-secret-value-42")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[batching]\nmax_items = 0\n"))
    assert "sk-secret-value-42" not in str(info.value)


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "[batching\n"))
