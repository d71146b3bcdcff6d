"""docs/scenario-reference.md is generated from the models and must be current."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from desim import docs
from desim.scenario import MemslotOpSpec, PhaseSpec, Scenario, TouchSpec

ROOT = Path(__file__).resolve().parent.parent


def test_the_checked_in_reference_is_current():
    current = (ROOT / docs.DEFAULT_PATH).read_text()
    assert current == docs.render(), "docs/scenario-reference.md is stale: run python -m desim.docs"


def test_every_scenario_field_is_in_the_reference():
    text = docs.render()
    for model in (Scenario, PhaseSpec, TouchSpec, MemslotOpSpec):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, name
    assert "| `hold_us` | number (>= 0) | `0` | µs (simulated) |" in text
    assert "| `time_limit_ms` | number (> 0) | `600,000` | ms (simulated) |" in text
    assert "| `size` | size (> 0) | **required** | bytes" in text
    assert '`"fast"` \\| `"targeted"`' in text


def test_a_field_without_a_docstring_is_refused():
    class Bare(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        said: int = 0
        """Documented."""
        silent: int = Field(default=1, ge=0)

    with pytest.raises(ValueError, match="Bare.silent has no docstring"):
        docs.field_rows(Bare)


def test_check_mode(tmp_path, capsys):
    f = tmp_path / "ref.md"
    assert docs.main(["--out", str(f), "--check"]) == 1
    assert docs.main(["--out", str(f)]) == 0 and docs.main(["--out", str(f), "--check"]) == 0
    f.write_text(f.read_text() + "edited by hand\n")
    assert docs.main(["--out", str(f), "--check"]) == 1
