"""Fuzz: mutated scenario/workload files either load or give the one clear DesimInputError."""
from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim.errors import DesimInputError
from desim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "workloads").rglob("*.toml")) + [ROOT / "desim" / "scenarios" / "default.toml"]
JUNK = ["-1", "0", "1e400", '"12 parsecs"', "true", "[1, 2]", "{ a = 1 }", '"0xfffffffffffffffffff"', '""',
        "99999999999999999999", '"all"', "3.5", '"\\u0000"']


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(FILES))
    lines = path.read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "value", "truncate", "swap", "garble"]))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(st.sampled_from(JUNK))}"
        elif kind == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = draw(st.text(max_size=30))
    return path, "\n".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_workload_files_load_or_fail_clearly(case, tmp_path_factory):
    src, text = case
    d = tmp_path_factory.mktemp("w")
    # keep relative trace paths working: mirror the file's place under workloads/
    f = d / src.name
    f.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        sc = load_scenario(f)
    except DesimInputError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip()
        return
    assert sc.phases  # loaded: a complete, validated scenario
