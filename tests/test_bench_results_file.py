"""A full benchmark run replaces its own section of bench/RESULTS.md and keeps every other one.

RESULTS.md also holds figures other commands produced (the embedded model's evaluation, the
load test); a benchmark run once overwrote the whole file and lost them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from report import SECTION_BEGIN, SECTION_END, write_section  # noqa: E402


def test_first_run_goes_under_the_title_and_keeps_the_rest(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## The embedded model\n\naccuracy 0.43\n")
    write_section(results, "## CPU benchmark\n\nratio 0.9\n")
    text = results.read_text()
    assert text.index("# Results") < text.index(SECTION_BEGIN) < text.index("ratio 0.9") < text.index(SECTION_END)
    assert text.index(SECTION_END) < text.index("accuracy 0.43")


def test_next_run_replaces_only_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n")
    write_section(results, "ratio 0.9\n")
    results.write_text(results.read_text() + "\n## Load test\n\n100 jobs in order\n")
    write_section(results, "ratio 0.8\n")
    text = results.read_text()
    assert "ratio 0.8" in text and "ratio 0.9" not in text
    assert "intro" in text and "100 jobs in order" in text
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1


def test_missing_file_is_created(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    write_section(results, "ratio 1.0\n")
    assert "ratio 1.0" in results.read_text() and results.read_text().startswith("# ")
