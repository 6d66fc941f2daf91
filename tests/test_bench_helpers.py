"""Small helpers the GPU benchmarks share, checked without a GPU: the L2 rotation count and its rotation, and the
CSV writer whose header is the union of the rows' keys."""

from __future__ import annotations

import csv

from edge_runtime.atomic_write import atomic_write_csv
from edge_runtime.bench import copies_past_l2, rotated


def test_copies_past_l2_hold_three_l2_fulls_within_bounds():
    l2 = 50 << 20
    assert copies_past_l2(l2, 10 << 20) == 15  # 15 x 10 MB = 3 x 50 MB
    assert copies_past_l2(l2, 11 << 20) == 14  # rounded up: 14 x 11 MB >= 150 MB
    assert copies_past_l2(l2, 1 << 20) == 16  # capped
    assert copies_past_l2(l2, 1 << 30) == 2 and copies_past_l2(l2, 1 << 30, least=1) == 1


def test_rotated_visits_the_items_in_turn():
    seen = []
    step = rotated(["a", "b", "c"], seen.append)
    for _ in range(7):
        step()
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]


def test_csv_header_is_every_key_in_first_seen_order(tmp_path):
    out = tmp_path / "rows.csv"
    atomic_write_csv(out, [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["a", "b", "c"]
    assert rows == [{"a": "1", "b": "2.5", "c": ""}, {"a": "3", "b": "", "c": "x"}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]  # no temporary file left beside it
