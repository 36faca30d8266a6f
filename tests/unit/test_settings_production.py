"""Production settings reject the Auth emulator, whose tokens are unsigned, and the server does not start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.settings import GOOGLE_CERTS_URL, Settings
from tests.servers import ROOT, free_port

EMULATOR_MESSAGE = "FIREBASE_AUTH_EMULATOR_HOST must be empty when APP_ENV=production"


def production_env(**extra: str) -> dict[str, str]:
    return {
        "APP_ENV": "production", "FIREBASE_CERTS_URL": GOOGLE_CERTS_URL, "FIREBASE_PROJECT_ID": "acme-prod",
        "STORAGE_SIGNING_KEY": "a-production-signing-key", **extra,
    }


def test_production_rejects_emulator_host():
    with pytest.raises(ValidationError, match=EMULATOR_MESSAGE):
        Settings(
            app_env="production", firebase_certs_url=GOOGLE_CERTS_URL, firebase_project_id="acme-prod",
            firebase_auth_emulator_host="127.0.0.1:9099",
        )


def test_production_rejects_emulator_host_from_environment(monkeypatch):
    for name, value in production_env(FIREBASE_AUTH_EMULATOR_HOST="127.0.0.1:9099").items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ValidationError, match=EMULATOR_MESSAGE):
        Settings()


def test_production_without_emulator_is_accepted(monkeypatch):
    for name, value in production_env(FIREBASE_AUTH_EMULATOR_HOST="").items():
        monkeypatch.setenv(name, value)

    settings = Settings()

    assert settings.app_env == "production"
    assert settings.firebase_auth_emulator_host == ""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"firebase_certs_url": ""}, "FIREBASE_CERTS_URL must be"),
        ({"firebase_certs_url": "http://127.0.0.1:9/certs"}, "FIREBASE_CERTS_URL must be"),
        ({"firebase_project_id": "functions-dev"}, "FIREBASE_PROJECT_ID must name your Firebase project"),
        ({"storage_signing_key": ""}, "STORAGE_SIGNING_KEY must be set"),
        ({"storage_backend": "supabase"}, "SUPABASE_URL and SUPABASE_SERVICE_KEY must be set"),
    ],
)
def test_production_rejects_development_defaults(overrides, message):
    values = {
        "app_env": "production", "firebase_certs_url": GOOGLE_CERTS_URL, "firebase_project_id": "acme-prod",
        "storage_signing_key": "a-production-signing-key",
    }

    with pytest.raises(ValidationError, match=message):
        Settings(**{**values, **overrides})


@pytest.mark.parametrize("app_env", ["development", "test"])
def test_emulator_host_is_allowed_outside_production(app_env):
    settings = Settings(app_env=app_env, firebase_auth_emulator_host="127.0.0.1:9099")

    assert settings.firebase_auth_emulator_host == "127.0.0.1:9099"


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_in_production_with_emulator_exits():
    result = run_serve(production_env(FIREBASE_AUTH_EMULATOR_HOST="127.0.0.1:9099"))

    assert result.returncode != 0
    assert EMULATOR_MESSAGE in result.stderr


def test_serve_in_production_with_emulator_prints_no_traceback():
    result = run_serve(production_env(FIREBASE_AUTH_EMULATOR_HOST="127.0.0.1:9099"))

    assert "Traceback" not in result.stderr
