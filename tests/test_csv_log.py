"""The one cut-back of a snapshot CSV on resume (callback and experiment runner alike)."""

import warnings

import pytest

from keras_hesstrace.experiments.storage import truncate_csv
from keras_hesstrace.monitor.csv_log import SnapshotCsv, cut_back

HEADER = "step,group,trace\r\n"
ROWS = ["0,head,1.5\r\n", "0,total,2.5\r\n", "4,head,1.25\r\n", "4,total,2.0\r\n", "8,head,1.0\r\n"]


def _write(path, text):
    path.write_bytes(text.encode())


def test_cut_back_keeps_rows_up_to_the_step_byte_for_byte(tmp_path):
    path = tmp_path / "t.csv"
    _write(path, HEADER + "".join(ROWS))
    header, kept, later, torn = cut_back(str(path), 4)
    assert header == ["step", "group", "trace"] and len(kept) == 4 and later == 1 and not torn
    assert path.read_bytes() == (HEADER + "".join(ROWS[:4])).encode()
    before = path.read_bytes()
    assert cut_back(str(path), 4)[2:] == (0, False)
    assert path.read_bytes() == before  # nothing removed: not rewritten


def test_a_torn_last_row_is_dropped_by_both_users(tmp_path):
    torn = HEADER + "".join(ROWS[:2]) + "4,head,1.2"  # a crash mid-row: no newline
    path = tmp_path / "runner.csv"
    _write(path, torn)
    assert truncate_csv(str(path), 100) == 2
    assert path.read_bytes() == (HEADER + "".join(ROWS[:2])).encode()
    path = tmp_path / "callback.csv"
    _write(path, torn)
    log = SnapshotCsv(str(path), ["step", "group", "trace"])
    with pytest.warns(UserWarning, match="incomplete row"):
        rows = log.prepare(100)
    assert [r["trace"] for r in rows] == ["1.5", "2.5"]
    log.append([[4, "head", 1.25]])
    assert path.read_bytes() == (HEADER + "".join(ROWS[:3])).encode()


def test_rows_past_the_resume_step_are_removed_with_a_warning(tmp_path):
    path = tmp_path / "t.csv"
    _write(path, HEADER + "".join(ROWS))
    log = SnapshotCsv(str(path), ["step", "group", "trace"])
    with pytest.warns(UserWarning, match="removing the 3 rows after step 0"):
        rows = log.prepare(0)
    assert len(rows) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(SnapshotCsv(str(path), ["step", "group", "trace"]).prepare(0)) == 2
    with pytest.raises(ValueError, match="has columns"):
        SnapshotCsv(str(path), ["step", "other"]).prepare(0)


def test_missing_or_headerless_files(tmp_path):
    assert cut_back(str(tmp_path / "none.csv"), 3) == (None, [], 0, False)
    path = tmp_path / "half.csv"
    _write(path, "step,gro")
    assert cut_back(str(path), 3) == (None, [], 0, True) and not path.exists()


def test_an_earlier_header_is_accepted_and_appended_to_in_its_layout(tmp_path):
    path = tmp_path / "old.csv"
    _write(path, HEADER + "".join(ROWS[:4]))
    log = SnapshotCsv(str(path), ["step", "group", "trace", "h"], older=[["step", "group", "trace"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = log.prepare(4)
    assert log.columns == ["step", "group", "trace"] and len(rows) == 4 and "h" not in rows[0]
    log.append([[8, "head", 1.0, 5.0]])  # rows come in the new layout; h is left out
    assert path.read_bytes() == (HEADER + "".join(ROWS)).encode()
    # A new file gets the new header; another header is still refused.
    fresh = SnapshotCsv(str(tmp_path / "new.csv"), ["step", "group", "trace", "h"],
                        older=[["step", "group", "trace"]])
    fresh.prepare(0)
    fresh.append([[0, "head", 1.5, 5.0]])
    assert (tmp_path / "new.csv").read_bytes() == b"step,group,trace,h\r\n0,head,1.5,5.0\r\n"
    with pytest.raises(ValueError, match="has columns"):
        SnapshotCsv(str(path), ["step", "group", "trace", "h"], older=[["step", "other"]]).prepare(0)
