"""The README's architecture table is the matrix test_matrix.py declares and tests, cell for cell, and
the declaration covers every architecture built, with a reason for every cell that is not HF PEFT's."""
from pathlib import Path

from matrix_models import BUILDERS
from test_matrix import CELLS, HF, MATRIX, REASONS, REFUSED, readme_table

README = Path(__file__).resolve().parents[2] / "README.md"
METHODS_DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_the_readme_table_is_the_tested_matrix():
    text = README.read_text(encoding="utf-8")
    table = readme_table()
    assert table in text, f"README.md's architecture table differs from the tested matrix; paste:\n{table}"


def test_every_architecture_and_reason_is_declared():
    assert list(MATRIX) == list(BUILDERS)
    assert {cell for cell in CELLS if MATRIX[cell[0]][cell[1]] != HF} == set(REASONS)
    assert all((MATRIX[a][m] == REFUSED) == (REASONS[a, m][1] is not None) for a, m in REASONS)


def test_docs_give_the_reason_of_every_cell_that_is_not_hf_pefts():
    text = " ".join(METHODS_DOC.read_text(encoding="utf-8").split())
    for (arch, method), (reason, _) in REASONS.items():
        assert f"{arch} `{method}`" in text and reason in text, (arch, method)
