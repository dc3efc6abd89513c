"""``benchmarks/run_benchmarks.py --only``: one section of ``docs/benchmarks.md`` refreshed, the rest kept verbatim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the `benchmarks` package lives at the root

from benchmarks import run_benchmarks  # noqa: E402
from benchmarks.run_benchmarks import Check, Section, update_sections  # noqa: E402

REPORT = """# Benchmarks

| Run | |
|---|---|
| Date | 2026-01-01 00:00 UTC |

## Targets (DESIGN.md §5)

| Target | Measured | Goal | Verdict |
|---|---:|---:|---|
| speed-up A | 3.00× | ≥ 2× | met |
| speed-up B | 1.50× | ≥ 2× | **missed** (1.33× short) |

## 1. First

old intro 1

| x |
|---|
| 1 |

## 2. Second

old intro 2

| y |
|---|
| 2 |

note 2

<!-- peers:begin -->
## Peer libraries
kept
<!-- peers:end -->
"""


def _section(title: str, cell: str, checks: tuple[Check, ...] = ()) -> Section:
    return Section(title, f"intro of {title}", ["c"], [[cell]], [f"note of {title}"], checks)


def test_a_section_of_the_same_title_is_replaced_in_place_with_its_number() -> None:
    updated = update_sections(REPORT, [_section("Second", "new")])
    head, tail = REPORT.split("## 2. Second")
    assert updated.startswith(head), "everything before the section is unchanged"
    assert "old intro 2" not in updated and "note 2\n" not in updated
    assert (
        "## 2. Second\n\nintro of Second\n\n| c |\n|---|\n| new |\n\nnote of Second\n\n<!-- peers:begin -->" in updated
    )
    assert updated.endswith("<!-- peers:begin -->\n## Peer libraries\nkept\n<!-- peers:end -->\n")
    assert update_sections(updated, [_section("Second", "new")]) == updated, "idempotent"


def test_a_new_section_is_numbered_next_and_goes_before_the_blocks() -> None:
    updated = update_sections(REPORT, [_section("Third", "3")])
    before, after = updated.split("## 3. Third")
    assert before == REPORT.split("<!-- peers:begin -->")[0]
    assert after.startswith("\n\nintro of Third\n\n| c |\n|---|\n| 3 |\n\nnote of Third\n\n<!-- peers:begin -->")
    without_blocks = update_sections("# Benchmarks\n\n## 1. First\n\nx\n", [_section("Second", "2")])
    assert (
        without_blocks == "# Benchmarks\n\n## 1. First\n\nx\n\n"
        "## 2. Second\n\nintro of Second\n\n| c |\n|---|\n| 2 |\n\nnote of Second\n"
    )


def test_the_target_rows_of_an_updated_section_are_replaced_and_only_those() -> None:
    updated = update_sections(REPORT, [_section("First", "1", (Check.at_least("speed-up B", 2.5, 2.0),))])
    assert "| speed-up B | 2.50× | ≥ 2× | met |" in updated
    assert "| speed-up A | 3.00× | ≥ 2× | met |" in updated
    assert "missed" not in updated


def test_main_only_runs_the_named_sections_and_keeps_the_header(tmp_path: Path, monkeypatch) -> None:
    output = tmp_path / "benchmarks.md"
    output.write_text(REPORT, encoding="utf-8")
    ran: list[list[str]] = []

    def fake_run_sections(names, *, repeats):
        ran.append(list(names))
        return [_section("First", "fresh")]

    monkeypatch.setattr(run_benchmarks, "run_sections", fake_run_sections)
    assert run_benchmarks.main(["--only", "language_model", "--output", str(output)]) == 0
    assert ran == [["language_model"]]
    text = output.read_text(encoding="utf-8")
    assert "| fresh |" in text and "old intro 1" not in text
    assert "| Date | 2026-01-01 00:00 UTC |" in text and "old intro 2" in text
    with pytest.raises(SystemExit):
        run_benchmarks.main(["--only", "language_model", "--output", str(tmp_path / "missing.md")])
