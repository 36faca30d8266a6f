"""fly.toml's environment, with the secrets it names, must make settings that production accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.settings import Settings

FLY_TOML = Path(__file__).resolve().parents[2] / "fly.toml"
# What `fly secrets set` provides in a real deployment; the values only need the right shape.
SECRETS = {
    "DATABASE_URL": "postgresql://app:secret@db.example.supabase.co:6543/postgres",
    "DATABASE_LISTEN_URL": "postgresql://app:secret@db.example.supabase.co:5432/postgres",
    "SUPABASE_URL": "https://example.supabase.co",
    "SUPABASE_SERVICE_KEY": "a-service-role-key",
}


@pytest.fixture
def fly() -> dict:
    return tomllib.loads(FLY_TOML.read_text())


def test_fly_environment_is_accepted_in_production(fly: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**fly["env"], **SECRETS, "FIREBASE_PROJECT_ID": "acme-prod"}.items():
        monkeypatch.setenv(name, value)

    settings = Settings()

    assert settings.app_env == "production"
    assert settings.storage_backend == "supabase"


def test_fly_waits_longer_than_the_shutdown_grace(fly: dict) -> None:
    grace = Settings.model_fields["shutdown_grace_seconds"].default

    assert fly["kill_timeout"] > grace
