"""The conformance matrix over every causal-LM model type of the installed transformers.

Runs ``hf_longctx.conformance`` once (a few minutes on 2 cores), writes ``docs/families.md`` from
the run, and checks the table: no wrong answer anywhere, every refusal with its reason, at least
100 model types passing every section they do not refuse, and the long-standing families passing
every rope type.
"""

from pathlib import Path

import pytest
from conftest import ALL_FAMILIES

from hf_longctx.conformance import SECTIONS, run_matrix, write_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "families.md"


@pytest.fixture(scope="module")
def rows():
    result = run_matrix()
    write_table(result, DOCS)
    return {row.model_type: row for row in result}


def test_no_cell_gives_a_wrong_answer(rows):
    failures = [f"{t}.{name}: {row.cells[name].reason}" for t, row in rows.items() for name in row.failures]
    assert not failures, "\n".join(failures)


def test_every_refusal_says_why(rows):
    for row in rows.values():
        for name, cell in row.cells.items():
            assert cell.status in ("pass", "refused", "FAIL")
            if cell.status == "refused":
                assert cell.reason and "\n" not in cell.reason, (row.model_type, name)


def test_at_least_100_model_types_pass_every_section_they_do_not_refuse(rows):
    # 100 of the 196 causal-LM model types of transformers 5.24; older releases have fewer types, of
    # which the same share must pass.
    required = min(100, len(rows) * 100 // 196)
    assert sum(row.passes for row in rows.values()) >= required, required


def test_the_long_standing_families_pass_every_rope_type_and_the_other_sections(rows):
    for model_type in [*ALL_FAMILIES, "gemma2", "granite", "cohere"]:
        cells = rows[model_type].cells
        assert cells["rope"].render() == "pass", (model_type, cells["rope"].render())
        for name in ("moe", "unpatch"):
            assert cells[name].status == "pass", (model_type, name, cells[name].render())


def test_the_table_has_one_row_per_model_type_and_one_column_per_section(rows):
    text = DOCS.read_text()
    assert "| model type | " + " | ".join(SECTIONS) + " |" in text
    for model_type in rows:
        assert f"\n| {model_type} | " in text
