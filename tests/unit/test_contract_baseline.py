"""The released contracts in proto/baseline.binpb catch a breaking change, as `make test` runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "proto" / "baseline.binpb"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is not installed in node_modules: run `CI=true npm ci --omit=optional`")


def breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(BASELINE)], cwd=workspace, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of buf.yaml and proto/ that a test may change."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    return tmp_path


def test_current_contracts_are_compatible(workspace: Path) -> None:
    result = breaking(workspace)

    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_reports_removed_field(workspace: Path) -> None:
    proto = workspace / "proto" / "functions" / "notification" / "v1" / "notification.proto"
    text = proto.read_text()
    assert text.count("  string body = 3;\n") == 1
    proto.write_text(text.replace("  string body = 3;\n", ""))

    result = breaking(workspace)

    assert result.returncode != 0
    assert 'Previously present field "3" with name "body" on message "SendRequest" was deleted' in result.stdout
