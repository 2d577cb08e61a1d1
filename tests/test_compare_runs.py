"""eval/compare_runs.py: matching rows of two harness runs, ranks with ties, how far rows move."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import compare_runs  # noqa: E402


def _rows(accs, keep=16):
    return [{"name": n, "keep_tokens": keep, "accuracy": a} for n, a in accs.items()]


def test_ties_share_their_mean_rank():
    assert compare_runs._ranks({"a": 0.9, "b": 0.8, "c": 0.8, "d": 0.1}) == {"a": 1, "b": 2.5, "c": 2.5, "d": 4}


def test_a_swap_of_two_rows_moves_each_by_one():
    a = _rows({"x": 0.9, "y": 0.8, "z": 0.5, "w": 0.2})
    b = _rows({"x": 0.8, "y": 0.9, "z": 0.5, "w": 0.2, "only_here": 0.99})  # unmatched rows are left out
    r = compare_runs.compare(a, b)[16]
    assert [row[0] for row in r["rows"]] == ["x", "y", "z", "w"]
    assert r["max_move"] == 1 and r["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert r["mean_abs_diff"] == pytest.approx(0.05)
    same = compare_runs.compare(a, a)[16]
    assert same["spearman"] == 1 and same["max_move"] == 0


def test_budgets_are_compared_apart_and_written(tmp_path):
    rows = _rows({"x": 0.9, "y": 0.5}, keep=32) + _rows({"x": 0.4, "y": 0.6}, keep=7)
    flipped = _rows({"x": 0.9, "y": 0.5}, keep=32) + _rows({"x": 0.6, "y": 0.4}, keep=7)
    for name, data in (("a.json", rows), ("b.json", flipped)):
        (tmp_path / name).write_text(json.dumps({"rows": data}))
    out = tmp_path / "cmp.md"
    assert compare_runs.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "s0", "s1",
                              "--out", str(out)]) == 0
    md = out.read_text()
    assert "| 32 | x | 90.0 | 90.0 | +0.0 | 1 | 1 |" in md and "| 7 | y | 60.0 | 40.0 | -20.0 | 1 | 2 |" in md
    assert "| 32 | 1.000 | 0 | 0.0 |" in md and "| 7 | -1.000 | 1 | 20.0 |" in md
