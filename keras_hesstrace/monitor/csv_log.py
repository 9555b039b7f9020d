"""The callback's CSV: one row per (snapshot, group), and the detectors' memory on resume.

``SnapshotCsv`` writes through: each snapshot's rows are appended by opening the file,
writing, flushing and closing it, so no handle is held between snapshots and a fit that
raises leaves a complete, closed file holding every finished snapshot.

On resume (``SnapshotCsv.prepare``) rows past the step the fit resumes from (snapshots of
a trajectory the restored checkpoint discarded) are removed, with a warning, and
``replay_detectors`` restores each detector by replaying its group's recorded values.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from keras_hesstrace.files import atomic_write_text

if TYPE_CHECKING:
    from keras_hesstrace.monitor.page_hinkley import PageHinkley


def cut_back(path: str | os.PathLike,
             last_step: int) -> tuple[list[str] | None, list[list[str]], int, bool]:
    """Keep a snapshot CSV's header and its complete rows with step <= ``last_step``.

    The one cut-back on resume (the callback's and the experiment runner's): the text
    after the file's last newline is a row torn by a crash and is dropped, as is any
    row with the wrong number of fields; the kept lines are written back byte for byte,
    atomically, and only when something was removed.

    Args:
        path: the CSV; its first column is the step.
        last_step: the last step to keep.

    Returns:
        ``(header, kept, later, torn)``: the header (list of str, or None for a missing,
        empty or header-less file, which is then removed), the kept rows (lists of str),
        how many complete rows lay past ``last_step``, and whether a torn or malformed
        line was dropped.
    """
    if not os.path.exists(path):
        return None, [], 0, False
    with open(path, newline="") as f:
        text = f.read()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    if not complete:
        os.remove(path)
        return None, [], 0, bool(tail)
    header = next(csv.reader([complete[0]]))
    kept_lines, kept, later, torn = [complete[0]], [], 0, bool(tail)
    for line in complete[1:]:
        row = next(csv.reader([line]), None)
        if not row or len(row) != len(header):
            torn = torn or bool(row)
            continue
        if int(row[0]) <= last_step:
            kept_lines.append(line)
            kept.append(row)
        else:
            later += 1
    if later or torn:
        atomic_write_text(path, "\n".join(kept_lines) + "\n")
    return header, kept, later, torn


TOTAL = "total"
BASE_COLUMNS = ["step", "epoch", "group", "trace", "stderr", "num_probes", "probe_seed",
                "wall_time", "status"]
DETECTOR_COLUMNS = ["z", "g_pos", "g_neg", "alert"]


def check_csv_path(csv_path: str | os.PathLike) -> str:
    """``csv_path`` as a str, after checking it can be written; else ``ValueError``."""
    csv_path = os.fspath(csv_path)
    parent = os.path.dirname(os.path.abspath(csv_path))
    if not os.path.isdir(parent):
        raise ValueError(f"csv_path {csv_path!r}: directory {parent!r} does not exist.")
    target = csv_path if os.path.exists(csv_path) else parent
    if not os.access(target, os.W_OK) or os.path.isdir(csv_path):
        raise ValueError(f"csv_path {csv_path!r} is not writable.")
    return csv_path


def csv_columns(with_detectors: bool) -> list[str]:
    """The CSV header: the base columns, then the detector's when there is one."""
    return BASE_COLUMNS + (DETECTOR_COLUMNS if with_detectors else [])


class SnapshotCsv:
    """A tidy CSV of snapshots at ``path`` with the header ``columns``."""

    def __init__(self, path: str, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)

    def prepare(self, step: int) -> list[dict[str, str]]:
        """Check the header of an existing file, cut it back to ``step``, write the
        header of a new one. Returns the rows kept (dicts column -> string)."""
        rows = []
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header is not None and header != self.columns:
                raise ValueError(
                    f"{self.path!r} has columns {header}, this callback writes "
                    f"{self.columns}: use another csv_path."
                )
            _, kept, later, torn = cut_back(self.path, step)
            rows = [dict(zip(self.columns, row)) for row in kept]
            if later:
                warnings.warn(
                    f"{self.path!r} holds snapshots after step {step}, where the fit resumes: removing "
                    f"the {later} rows after step {step} (a trajectory the restored checkpoint discarded).",
                    stacklevel=3,
                )
            if torn:
                warnings.warn(f"{self.path!r} ended in an incomplete row (a write cut short): removed it.",
                              stacklevel=3)
        new = not rows and not (os.path.exists(self.path) and os.path.getsize(self.path) > 0)
        if new:
            self.append([self.columns])
        return rows

    def append(self, rows: Sequence[Sequence]) -> None:
        """Append ``rows`` (lists of values), flushed and closed before returning."""
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(rows)


def replay_detectors(path: str, rows: list[dict[str, str]], detectors: dict[str, PageHinkley],
                     groups: Sequence[str]) -> None:
    """Restore ``detectors`` (dict group -> PageHinkley) from the CSV ``rows`` at ``path``.

    ``groups`` are the groups the callback records (``"total"`` is added). Replaying the
    recorded values restores g+, g-, the first alert and a reference snapshot's value
    exactly (the CSV holds the floats' repr); a replay that disagrees with the recorded
    g+, g- means another detector wrote the file and raises ``ValueError``.
    """
    if not rows:
        return
    expected = set(groups) | {TOTAL}
    found = {r["group"] for r in rows}
    if found != expected:
        raise ValueError(
            f"{path!r} records groups {sorted(found)}, this callback records "
            f"{sorted(expected)}: use another csv_path, or the same groups/layers."
        )
    for g, det in detectors.items():
        mine = [r for r in rows if r["group"] == g]
        if any(r["g_pos"].strip() in ("", "nan") for r in mine):
            raise ValueError(
                f"{path!r} has rows of group {g!r} written without a detector "
                "on it, so its detector cannot be restored: use another csv_path."
            )
        problem = _replay(det, mine)
        if problem is not None:
            raise ValueError(
                f"{path!r}: group {g!r}'s rows were written with another "
                f"detector (calibration): {problem}. Use another csv_path, or the same "
                "detector."
            )


def _replay(det, mine):
    """Reset ``det`` and feed it ``mine``; a description of the first mismatch, or None."""
    det.reset()
    replayed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an overrun="hold" warning was given then
        for r in mine:
            step = int(r["step"])
            try:
                if r["status"] == "ok":
                    det.update(float(r["trace"]), step=step)
                else:
                    det.skip(float(r["trace"]), step=step)
            except ValueError as e:
                return f"at step {step} this detector refuses the recorded value ({e})"
            replayed.append((det.g_pos, det.g_neg))
    recorded = np.array([(float(r["g_pos"]), float(r["g_neg"])) for r in mine])
    close = np.all(np.isclose(np.array(replayed), recorded, rtol=1e-9, atol=1e-12), axis=1)
    if not close.all():
        i = int(np.argmin(close))
        return (f"at step {mine[i]['step']} replaying gives g+, g- = "
                f"{replayed[i][0]:.6g}, {replayed[i][1]:.6g}, the CSV says "
                f"{recorded[i][0]:.6g}, {recorded[i][1]:.6g}")
    return None
