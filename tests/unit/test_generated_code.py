"""gen/ must be exactly what scripts/generate.py makes from proto/ today."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in committed gen/: {name}" for name in comparison.left_only]
    found += [f"missing from gen/: {name}" for name in comparison.right_only]
    found += [f"differs: {name}" for name in comparison.diff_files]
    for name, sub in comparison.subdirs.items():
        found += [f"{name}/{line}" for line in _differences(left / name, right / name)]
    return found


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generator = _load_generator()
    generator.generate(tmp_path / "gen")

    differences = _differences(ROOT / "gen", tmp_path / "gen")

    assert differences == [], "gen/ is stale; run `make generate` and commit the result:\n" + "\n".join(differences)
