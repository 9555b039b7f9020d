"""The callback's CSV: one row per (snapshot, group), and the detectors' memory on resume.

``SnapshotCsv`` writes through: each snapshot's rows are appended by opening the file,
writing, flushing and closing it, so no handle is held between snapshots and a fit that
raises leaves a complete, closed file holding every finished snapshot.

On resume (``SnapshotCsv.prepare``) rows past the step the fit resumes from (snapshots of
a trajectory the restored checkpoint discarded) are removed, with a warning, and so are
the rows of a last snapshot that lacks some group's row (a crash between its rows), so
that the fit retakes it; ``replay_detectors`` then restores each detector by replaying
its group's recorded values.

Identity. Beside the CSV lies ``<csv>.identity.json`` (``csv_identity``): the model's
fingerprint, the recorded groups and the settings that make its numbers comparable
(grouping, probe seed, snapshot interval, probes). ``check_csv_identity`` refuses to
resume a CSV whose sidecar says another run wrote it.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from keras_hesstrace.files import atomic_write_json, atomic_write_text, read_json
from keras_hesstrace.identity import describe_mismatch, model_fingerprint

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
DETECTOR_COLUMNS = ["h", "z", "g_pos", "g_neg", "alert"]
# The detector columns before the threshold h was written (a CSV with them still resumes,
# and is appended to in its own layout).
DETECTOR_COLUMNS_WITHOUT_H = ["z", "g_pos", "g_neg", "alert"]


def check_csv_path(csv_path: str | os.PathLike) -> str:
    """``csv_path`` as a str, after checking it can be written; else ``ValueError``.

    The directory must be writable too, even for an existing, writable file: the
    cut-back on resume rewrites the file through a temporary beside it, and the
    identity sidecar and the lock file are created there.
    """
    csv_path = os.fspath(csv_path)
    parent = os.path.dirname(os.path.abspath(csv_path))
    if not os.path.isdir(parent):
        raise ValueError(f"csv_path {csv_path!r}: directory {parent!r} does not exist.")
    if os.path.isdir(csv_path) or (os.path.exists(csv_path) and not os.access(csv_path, os.W_OK)):
        raise ValueError(f"csv_path {csv_path!r} is not writable.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"csv_path {csv_path!r}: its directory {parent!r} is not writable (the callback "
            "creates files beside the CSV: its identity sidecar, lock and rewrites)."
        )
    return csv_path


def csv_columns(with_detectors: bool) -> list[str]:
    """The CSV header: the base columns, then the detector's when there is one."""
    return BASE_COLUMNS + (DETECTOR_COLUMNS if with_detectors else [])


def older_csv_columns(with_detectors: bool) -> list[list[str]]:
    """Headers of earlier versions that a resumed fit still accepts (appending in them)."""
    return [BASE_COLUMNS + DETECTOR_COLUMNS_WITHOUT_H] if with_detectors else []


def identity_path(csv_path: str) -> str:
    """The identity sidecar of ``csv_path``: ``<csv_path>.identity.json``."""
    return f"{csv_path}.identity.json"


def _describe_grouping(by) -> str:
    """``by`` (a ``layer_groups`` grouping) as a text that is the same in every process."""
    if isinstance(by, str):
        return by
    if callable(by):
        return f"callable {getattr(by, '__module__', '?')}.{getattr(by, '__qualname__', repr(by))}"
    if isinstance(by, dict) and by and all(isinstance(v, (list, tuple)) for v in by.values()):
        return "explicit variable groups"  # the variables' reprs hold build-scope paths
    return repr(by)


def csv_identity(model, groups: Sequence[str], by, seed: int, every_n_steps: int,
                 num_probes: int, rel_stderr: float | None = None, max_probes: int | None = None) -> dict:
    """What the callback's CSV belongs to, as saved in its sidecar.

    Args:
        model: the fitted model (its ``model_fingerprint``).
        groups: the recorded groups, ``"total"`` included.
        by: the grouping (``HessianTraceCallback``'s ``by``).
        seed, every_n_steps, num_probes, rel_stderr, max_probes: the callback's settings
            of those names (the last two only with a target, so that sidecars written
            before them still match a run without one).

    Returns:
        dict with keys model, groups, by, seed, every_n_steps, num_probes (and
        rel_stderr, max_probes with a target).
    """
    identity = {"model": model_fingerprint(model), "groups": list(groups),
                "by": _describe_grouping(by), "seed": int(seed),
                "every_n_steps": int(every_n_steps), "num_probes": int(num_probes)}
    if rel_stderr is not None:
        identity.update(rel_stderr=float(rel_stderr), max_probes=int(max_probes))
    return identity


def check_csv_identity(csv_path: str, identity: dict) -> bool:
    """Refuse to resume ``csv_path`` when its sidecar says another run wrote it.

    Returns:
        True when the CSV has no sidecar (written by an older version), else False.

    Raises:
        ValueError: ``"<csv_path> was written by another run: <what differs>"``.
    """
    sidecar = identity_path(csv_path)
    if not os.path.exists(sidecar):
        return True
    saved = read_json(sidecar)
    if not isinstance(saved, dict):
        raise ValueError(f"{sidecar!r} is not an identity (a JSON object); remove it or use "
                         "another csv_path.")
    difference = describe_mismatch(saved, identity)
    if difference is not None:
        raise ValueError(f"{csv_path!r} was written by another run: {difference}. "
                         "Use another csv_path.")
    return False


def write_csv_identity(csv_path: str, identity: dict) -> None:
    """Write ``identity`` to the sidecar of ``csv_path`` (strict JSON, atomically)."""
    atomic_write_json(identity_path(csv_path), identity)


class SnapshotCsv:
    """A tidy CSV of snapshots at ``path`` with the header ``columns``.

    ``older``: earlier headers an existing file may have (each a subset of ``columns``);
    such a file is kept in its layout: ``prepare`` sets ``columns`` to its header and
    ``append`` writes only those of the rows' values (rows are given in ``expected``'s
    order, the constructor's ``columns``).
    """

    def __init__(self, path: str, columns: Sequence[str],
                 older: Sequence[Sequence[str]] = ()) -> None:
        self.path = path
        self.expected = list(columns)
        self.columns = list(columns)
        self.older = [list(h) for h in older]

    def prepare(self, step: int, groups: Sequence[str] | None = None,
                every_n_steps: int | None = None) -> list[dict[str, str]]:
        """Check the header of an existing file, cut it back to ``step``, write the
        header of a new one. Returns the rows kept (dicts column -> string).

        Args:
            step: the optimiser step the fit resumes from.
            groups: every group a snapshot has a row of (``"total"`` included); when
                given, a last snapshot lacking some of them is removed, to be retaken.
                Defaults to None: no check.
            every_n_steps: the snapshot interval; a snapshot is retaken at ``step``
                only when ``step`` is a multiple of it. Defaults to None (any step).

        Raises:
            ValueError: another header; an incomplete snapshot the fit cannot retake.
        """
        rows = []
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header is not None and header in self.older:
                self.columns = header  # an earlier version's file: appended in its layout
            elif header is not None and header != self.expected:
                raise ValueError(
                    f"{self.path!r} has columns {header}, this callback writes "
                    f"{self.expected}: use another csv_path."
                )
            _, kept, later, torn = cut_back(self.path, step)
            if later:
                warnings.warn(
                    f"{self.path!r} holds snapshots after step {step}, where the fit resumes: removing "
                    f"the {later} rows after step {step} (a trajectory the restored checkpoint discarded).",
                    stacklevel=3,
                )
            if torn:
                warnings.warn(f"{self.path!r} ended in an incomplete row (a write cut short): removed it.",
                              stacklevel=3)
            if groups is not None:
                kept = self._drop_partial_snapshot(kept, step, set(groups), every_n_steps)
            rows = [dict(zip(self.columns, row)) for row in kept]
        new = not rows and not (os.path.exists(self.path) and os.path.getsize(self.path) > 0)
        if new:
            self.columns = list(self.expected)
            self._write([self.columns])
        return rows

    def _drop_partial_snapshot(self, kept, step, expected, every_n_steps):
        """``kept`` less a last snapshot lacking some of the ``expected`` groups' rows.

        Those rows are cut from the file (``cut_back`` to the snapshot before) with a
        warning, so the fit resuming at ``step`` retakes the snapshot whole. A file
        whose groups are others altogether is left to ``replay_detectors`` to refuse.
        """
        column = self.columns.index("group")
        found_at = {}  # step -> groups with a row there, in file order
        for row in kept:
            found_at.setdefault(int(row[0]), set()).add(row[column])
        found = set().union(*found_at.values()) if found_at else set()
        if not found or found - expected or (found != expected and len(found_at) > 1):
            return kept
        partial = [s for s, there in found_at.items() if there != expected]
        if not partial:
            return kept
        last = max(found_at)
        missing = sorted(expected - found_at[partial[0]])
        if partial != [last] or last != step or (every_n_steps and step % every_n_steps):
            raise ValueError(
                f"{self.path!r}: the snapshot at step {partial[0]} is incomplete (no row of "
                f"{missing}: a crash between its rows), and this fit, resuming at step "
                f"{step}, cannot retake it. Resume from a checkpoint of step {partial[0]}, "
                "or use another csv_path."
            )
        dropped = len(found_at[last])
        previous = max((s for s in found_at if s != last), default=-1)
        _, kept, _, _ = cut_back(self.path, previous)
        warnings.warn(
            f"{self.path!r}: the snapshot at step {last} is incomplete (a crash between its "
            f"rows: no row of {missing}); removed its {dropped} row(s) "
            f"({sorted(found_at[last])}): the fit retakes it at step {step}.",
            stacklevel=4,
        )
        return kept

    def append(self, rows: Sequence[Sequence]) -> None:
        """Append ``rows`` (lists of values in the order of the constructor's
        ``columns``; only the file's columns are written), flushed and closed."""
        if self.columns != self.expected:
            keep = [self.expected.index(c) for c in self.columns]
            rows = [[row[i] for i in keep] for row in rows]
        self._write(rows)

    def _write(self, rows):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(rows)


def open_snapshot_csv(path: str, columns: Sequence[str], identity: dict, step: int,
                      every_n_steps: int, older: Sequence[Sequence[str]] = ()
                      ) -> tuple[SnapshotCsv, list[dict[str, str]]]:
    """The callback's CSV at ``path``, prepared for a fit starting at ``step``.

    ``older``: earlier headers accepted on resume (``older_csv_columns``): such a file
    keeps its layout.

    An existing CSV is first checked against its sidecar (``check_csv_identity``), then
    cut back (``SnapshotCsv.prepare`` with ``identity["groups"]``); one without a sidecar
    (an older version's) is adopted with a warning and given one. A new CSV gets its
    sidecar before its header.

    Returns:
        ``(csv, rows)``: the ``SnapshotCsv`` and the rows kept (dicts column -> string).
    """
    existing = os.path.exists(path) and os.path.getsize(path) > 0
    adopted = existing and check_csv_identity(path, identity)  # refuses another run's file
    if not existing:
        write_csv_identity(path, identity)
    log = SnapshotCsv(path, columns, older)
    rows = log.prepare(step, identity["groups"], every_n_steps)
    if adopted:
        write_csv_identity(path, identity)
        warnings.warn(f"{path!r} has no identity sidecar (written by an older version): "
                      f"adopted it as this run's and wrote {identity_path(path)!r}.",
                      stacklevel=4)
    return log, rows


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
