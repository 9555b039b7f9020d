"""Fault injection: kill the experiment runner and a training fit with the callback, restart, compare.

Nothing may be lost, duplicated or adopted. Each part runs an uninterrupted reference,
then the same work killed (SIGKILL) at chosen moments and restarted until it finishes,
and compares the two value for value.

Runner (``keras-hesstrace experiment --preset tiny``: 5 runs, calibration, summary), each
trial in a fresh folder: killed at one of these moments (watched from the output folder),
restarted to the end, compared with the reference:

    config       config.json written, nothing trained
    csv-2        the first run's traces.csv holds 2 snapshots' rows
    checkpoint   the first checkpoint.npz appears
    result-1     the first result.json appears
    csv-mid      a later run is half-way through its snapshots
    calibration  calibration.json appears
    phase-2      a held-out / noisy run's traces.csv appears
    trajectory   the last run's trajectory.json appears (its result.json not yet)
    summary      summary.csv appears (the report is being written)
    random x N   after a random delay (seeded)

Equal means: every run's traces.csv equal to the reference's (wall_time and epoch aside), the same
result.json values (wall time and process count aside), the same summary.csv / detections.csv /
comparison.csv / stops.csv (a run's wall time aside), no ``*.tmp<pid>`` file and no checkpoint.npz of a finished run left. Also: a
second runner started on the folder while the first runs is refused (and the first
finishes unharmed), and a run folder copied from another seed is refused on resume.

Callback (a small CNN on the digits with ``HessianTraceCallback(csv_path=..., detector=...)``
and ``keras.callbacks.BackupAndRestore`` at epoch ends), killed after 1, 3, 5, 7 and 9 snapshots, and
with the CSV cut at a random byte of its last snapshot before restarting (a torn line
or a partial snapshot, as a kill in the middle of a write leaves): the final CSV must
equal the uninterrupted one (trace, stderr, z, g+, g-, alert included; wall_time and
the epoch of a snapshot on an epoch boundary aside).

    python benchmarks/fault_injection.py                 # both parts, ~10 min on 2 cores
    python benchmarks/fault_injection.py --part callback --random-kills 0

Prints one line per kill and a table; exits 1 when anything differs.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT_FILES = ("summary.csv", "detections.csv", "comparison.csv", "stops.csv")


# ------------------------------------------------------------------------ helpers


def _wait_then_kill(cmd, condition, timeout, env=None):
    """Start ``cmd``; SIGKILL it once ``condition()`` holds. Returns (killed, seconds, rc)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    while proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, time.perf_counter() - start, proc.returncode
        if time.perf_counter() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{cmd} ran past {timeout} s")
        time.sleep(0.02)
    return False, time.perf_counter() - start, proc.returncode


def _rows(path):
    """A CSV's rows without its wall-time and epoch columns (list of lists of str).

    The epoch is left out because a snapshot on an epoch boundary is recorded with the
    epoch that ended in an uninterrupted fit and with the epoch that starts in a fit
    resumed there: the same step, weights and values.
    """
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    drop = {rows[0].index(c) for c in ("wall_time", "wall_time_s", "epoch") if rows and c in rows[0]}
    return [[v for i, v in enumerate(r) if i not in drop] for r in rows]


def _data_rows(path):
    return max(len(_rows(path)) - 1, 0) if os.path.exists(path) else 0


def _find(out, pattern):
    return sorted(glob.glob(os.path.join(out, "**", pattern), recursive=True))


# ------------------------------------------------------------------------- runner


def _runner_cmd(out):
    return [sys.executable, "-m", "keras_hesstrace.cli", "experiment", "--preset", "tiny", "--out", out]


def _runner_points(rng, n_random, typical_seconds, n_runs):
    """(name, condition) of each kill point; a condition takes the out folder."""
    def csv_rows_at_least(k, index):
        def check(out):
            files = _find(out, "traces.csv")
            return len(files) > index and _data_rows(files[index]) >= k
        return check

    points = [
        ("config", lambda out: os.path.exists(os.path.join(out, "config.json"))),
        ("csv-2", csv_rows_at_least(2 * 3, 0)),  # 2 snapshots x (2 layer groups + total)
        ("checkpoint", lambda out: bool(_find(out, "checkpoint.npz"))),
        ("result-1", lambda out: bool(_find(out, "result.json"))),
        ("csv-mid", csv_rows_at_least(8 * 3, 1)),
        ("calibration", lambda out: bool(_find(out, "calibration.json"))),
        ("phase-2", lambda out: len(_find(out, "traces.csv")) >= 4),
        ("trajectory", lambda out: len(_find(out, "trajectory.json")) >= n_runs),
        ("summary", lambda out: os.path.exists(os.path.join(out, "summary.csv"))),
    ]
    for i in range(n_random):
        delay = rng.uniform(5.0, 0.7 * typical_seconds)  # before a restarted run can end
        start = []  # the first check's time: the process has just been started

        def after(out, d=delay, start=start):
            start.append(time.perf_counter())
            return time.perf_counter() - start[0] > d

        points.append((f"random-{i} ({delay:.0f} s)", after))
    return points


def _compare_runner(ref, out):
    problems = []
    ref_csvs = {os.path.relpath(p, ref) for p in _find(ref, "traces.csv")}
    out_csvs = {os.path.relpath(p, out) for p in _find(out, "traces.csv")}
    if ref_csvs != out_csvs:
        problems.append(f"trace CSVs differ: {sorted(ref_csvs ^ out_csvs)}")
    for rel in sorted(ref_csvs & out_csvs):
        a, b = _rows(os.path.join(ref, rel)), _rows(os.path.join(out, rel))
        if a != b:
            problems.append(f"{rel}: {len(a) - 1} rows in the reference, {len(b) - 1} here, or values differ")
    for path in _find(ref, "result.json"):
        rel = os.path.relpath(path, ref)
        with open(path) as f:
            a = json.load(f)
        with open(os.path.join(out, rel)) as f:
            b = json.load(f)
        skip = {"wall_time_s", "segments"}  # how long, and in how many processes
        if {k: v for k, v in a.items() if k not in skip} != {k: v for k, v in b.items() if k not in skip}:
            problems.append(f"{rel} differs")
    for name in REPORT_FILES:  # byte for byte but for the runs' wall times
        a, b = os.path.join(ref, name), os.path.join(out, name)
        if os.path.exists(a) and (not os.path.exists(b) or _rows(a) != _rows(b)):
            problems.append(f"{name} differs")
    left = [p for p in _find(out, "*") if ".tmp" in os.path.basename(p)]
    if left:
        problems.append(f"temporary files left: {left}")
    finished = [os.path.dirname(p) for p in _find(out, "result.json")]
    stale = [d for d in finished if os.path.exists(os.path.join(d, "checkpoint.npz"))]
    if stale:
        problems.append(f"checkpoint.npz left in {len(stale)} finished run(s)")
    return problems


def runner_part(work, n_random, seed):
    rows = []
    ref = os.path.join(work, "runner-reference")
    t = time.perf_counter()
    subprocess.run(_runner_cmd(ref), check=True, stdout=subprocess.DEVNULL)
    typical = time.perf_counter() - t
    print(f"runner reference: {typical:.0f} s", flush=True)

    n_runs = len(_find(ref, "trajectory.json"))
    for i, (name, condition) in enumerate(_runner_points(random.Random(seed), n_random, typical, n_runs)):
        out = os.path.join(work, f"runner-kill-{i}")
        killed, seconds, _ = _wait_then_kill(_runner_cmd(out), lambda: condition(out), 20 * typical)
        subprocess.run(_runner_cmd(out), check=True, stdout=subprocess.DEVNULL)  # restart to the end
        problems = _compare_runner(ref, out)
        outcome = ("equal" if not problems else "DIFFERS: " + "; ".join(problems)) if killed else "NOT REACHED"
        print(f"  runner killed at {name} after {seconds:.1f} s, restarted: {outcome}", flush=True)
        rows.append(("runner", f"kill at {name}", outcome))

    # Two runners on one folder: the second is refused while the first works.
    two = os.path.join(work, "runner-two")
    first = subprocess.Popen(_runner_cmd(two), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not _find(two, "traces.csv") and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(_runner_cmd(two), capture_output=True, text=True)
    first.wait()
    refused = second.returncode != 0 and "in use" in second.stderr
    same = not _compare_runner(ref, two)
    rows.append(("runner", "second runner on the same --out", "refused" if refused else f"NOT refused: {second.stderr[-300:]}"))
    rows.append(("runner", "the first runner, beside it, equal to the reference", "yes" if same else "no"))

    # A run folder copied from another seed: refused on resume.
    adopt = os.path.join(work, "runner-adopt")
    shutil.copytree(ref, adopt)
    run_dirs = sorted(os.path.dirname(p) for p in _find(adopt, "result.json"))
    victim = run_dirs[1]
    shutil.rmtree(victim)
    shutil.copytree(run_dirs[0], victim)
    for name in REPORT_FILES:
        if os.path.exists(os.path.join(adopt, name)):
            os.remove(os.path.join(adopt, name))
    res = subprocess.run(_runner_cmd(adopt), capture_output=True, text=True)
    rows.append(("runner", "a run folder copied from another seed", "refused" if res.returncode != 0 and "seed" in res.stderr
                 else f"ADOPTED (rc {res.returncode}): {res.stderr[-300:]}"))
    return rows


# ----------------------------------------------------------------------- callback

CHILD = r'''
import sys
import numpy as np
import keras_hesstrace as kh
import tensorflow as tf
import keras
from keras_hesstrace.monitor import HessianTraceCallback, PageHinkley

tf.config.experimental.enable_op_determinism()
keras.utils.set_random_seed(0)
work = sys.argv[1]
from sklearn.datasets import load_digits
d = load_digits()
x = (d.images[:320, :, :, None] / 16.0).astype("float32")
y = d.target[:320].astype("int64")
model = kh.models.small_cnn(10, (8, 8, 1))
model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
# A detector that never alerts, so that g+ and g- run over the whole fit and every resume
# has to restore them exactly.
detector = PageHinkley(delta=0.5, threshold=1e9,
                       baseline=kh.monitor.Baseline(np.zeros(40), np.ones(40), transform="log"))
cb = HessianTraceCallback((x[:64], y[:64]), every_n_steps=5, num_probes=2, csv_path=work + "/traces.csv",
                          detector={"total": detector}, seed=3, verbose=0)
# Backups at epoch ends: Keras resumes a fit at an epoch boundary exactly; a mid-epoch
# backup (save_freq=k steps) restarts that epoch's batches from its first with the step
# counter already advanced, so the run itself would differ from an uninterrupted one.
backup = keras.callbacks.BackupAndRestore(work + "/backup", save_freq="epoch")
model.fit(x, y, batch_size=32, epochs=5, shuffle=False, verbose=0, callbacks=[backup, cb])
'''


def _describe_difference(reference, rows):
    """None when the row lists are equal, else where they first differ (in words)."""
    if rows == reference:
        return None
    for i, (a, b) in enumerate(zip(reference, rows)):
        if a != b:
            return f"DIFFERS from row {i} (step {a[0]} in the reference, {b[0]} here)"
    return f"DIFFERS: {len(reference) - 1} rows in the reference, {len(rows) - 1} here"


def _callback_cmd(work):
    return [sys.executable, "-c", CHILD, work]


def callback_part(work, seed):
    rows = []
    ref = os.path.join(work, "callback-reference")
    os.makedirs(ref)
    subprocess.run(_callback_cmd(ref), check=True)
    reference = _rows(os.path.join(ref, "traces.csv"))
    column = reference[0].index("group")
    groups = len({r[column] for r in reference[1:]})
    rng = random.Random(seed)
    for snapshots in (1, 3, 5, 7, 9):
        for damage in ("none", "cut"):
            run = os.path.join(work, f"callback-{snapshots}-{damage}")
            os.makedirs(run)
            csv = os.path.join(run, "traces.csv")
            killed, _, _ = _wait_then_kill(_callback_cmd(run), lambda: _data_rows(csv) >= snapshots * groups, 600)
            if not killed:
                rows.append(("callback", f"kill after {snapshots} snapshot(s), {damage}", "NOT REACHED"))
                continue
            note = ""
            if damage == "cut" and os.path.exists(csv):
                size = os.path.getsize(csv)
                with open(csv, "rb") as f:
                    text = f.read()
                last_snapshot_start = text.rstrip(b"\n").rsplit(b"\n", groups)[0]
                cut = rng.randint(len(last_snapshot_start) + 1, size - 1)
                with open(csv, "r+b") as f:
                    f.truncate(cut)
                note = f", cut at byte {cut} of {size}"
            done = subprocess.run(_callback_cmd(run), capture_output=True, text=True)
            if done.returncode != 0:
                outcome = f"FAILED (rc {done.returncode}): {done.stderr.strip().splitlines()[-1]}"
            else:
                outcome = _describe_difference(reference, _rows(csv)) or "equal"
            print(f"  callback killed after {snapshots} snapshot(s){note}: {outcome}", flush=True)
            rows.append(("callback", f"kill after {snapshots} snapshot(s), {damage}", outcome))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("both", "runner", "callback"), default="both")
    parser.add_argument("--random-kills", type=int, default=3, help="runner kills at random moments")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill moments and CSV cuts")
    parser.add_argument("--keep", default=None, help="folder to keep the runs in (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="fault-injection-")
    os.makedirs(work, exist_ok=True)
    rows = []
    if args.part in ("both", "runner"):
        rows += runner_part(work, args.random_kills, args.seed)
    if args.part in ("both", "callback"):
        rows += callback_part(work, args.seed)
    print("\n| part | fault | outcome |\n|---|---|---|")
    for part, fault, outcome in rows:
        print(f"| {part} | {fault} | {outcome} |")
    bad = [r for r in rows if r[2] not in ("yes", "refused", "equal")]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
