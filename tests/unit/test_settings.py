"""Settings checks that apply in every environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import Settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_url": "mysql://localhost/test"}, "DATABASE_URL must be a sqlite or postgresql URL: got scheme 'mysql'"),
        ({"database_listen_url": "sqlite:///x.db"}, "DATABASE_LISTEN_URL must be a postgresql URL: got scheme 'sqlite'"),
        ({"enabled_services": "users,billing"}, "ENABLED_SERVICES has unknown services ['billing']"),
        ({"storage_backend": "supabase"}, "SUPABASE_URL and SUPABASE_SERVICE_KEY must be set"),
    ],
)
def test_invalid_settings_name_the_setting(overrides, message):
    with pytest.raises(ValidationError) as raised:
        Settings(**overrides)

    assert message in str(raised.value)


def test_lists_are_read_from_comma_separated_environment_values(monkeypatch):
    monkeypatch.setenv("ENABLED_SERVICES", "users, notifications")
    monkeypatch.setenv("FILES_ALLOWED_TYPES", "image/png,text/plain")

    settings = Settings()

    assert settings.enabled_services == ["users", "notifications"]
    assert settings.files_allowed_types == ["image/png", "text/plain"]
