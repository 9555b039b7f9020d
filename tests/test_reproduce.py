"""Every committed round's documented numbers recompute, byte for byte, from its committed
trajectories: calibration, Table 1, detections, the baselines and what a stop is worth."""

import filecmp
import glob
import json
import os

import pytest

from keras_hesstrace.experiments.config import cells
from keras_hesstrace.experiments.report import summarize
from keras_hesstrace.experiments.scoring import calibrate_cell
from keras_hesstrace.experiments.storage import restore_round

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "memorisation")
ROUNDS = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(DOCS, "*", "trajectories")))
REPORTS = ("summary.md", "summary.csv", "detections.csv", "comparison.csv", "stops.csv")


def test_the_confirmatory_round_is_committed_with_its_trajectories():
    assert "cpu-confirm" in [os.path.basename(r) for r in ROUNDS]


@pytest.mark.parametrize("round_dir", ROUNDS, ids=[os.path.basename(r) for r in ROUNDS])
def test_committed_round_recomputes_byte_for_byte(round_dir, tmp_path):
    out = tmp_path / "restored"
    config = restore_round(round_dir, out)
    for arch, dataset in cells(config):
        calibrate_cell(config, out, arch, dataset)
        cell = f"{arch}-{dataset}"
        assert _same_calibration(os.path.join(round_dir, f"{cell}-calibration.json"),
                                 out / cell / "calibration.json"), cell
    summarize(config, out, progress=False)
    for name in REPORTS:
        assert filecmp.cmp(os.path.join(round_dir, name), out / name, shallow=False), name


def _same_calibration(committed, recomputed) -> bool:
    """Byte for byte; or, for a round committed in calibration format version 4, the same
    JSON value once upgraded to the current format: its ``version`` and a
    ``model_fingerprint`` of None (a round's trajectories do not record the model)."""
    if filecmp.cmp(committed, recomputed, shallow=False):
        return True
    with open(committed, encoding="utf-8") as f:
        old = json.load(f)
    with open(recomputed, encoding="utf-8") as f:
        new = json.load(f)
    if old.get("version") != 4 or "model_fingerprint" in old:
        return False
    return {**old, "version": new["version"], "model_fingerprint": None} == new
