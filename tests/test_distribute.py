"""layer_traces and hvp under MirroredStrategy over two logical CPUs equal one device."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mirrored_strategy_gives_the_single_device_estimate():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed_check.py")],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE),
        env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["replicas"] == 2
    for name in ("mlp", "cnn_bn"):
        assert out[f"{name}_distributed"] is True
        for key in ("samples", "loss", "hvp_reverse", "hvp_forward", "dataset", "one_example",
                    "chunked_reverse", "chunked_forward"):
            value = out[f"{name}_{key}"]
            assert isinstance(value, float), f"{name}_{key}: {value}"
            assert value < 1e-10, f"{name}_{key}: {value}"
    assert out["fit_loss_finite"] is True


def test_multi_worker_mirrored_strategy_on_localhost_gives_the_single_device_estimate():
    root = os.path.dirname(HERE)
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "multiworker_traces.py")],
        capture_output=True, text=True, timeout=600, cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["replicas"] == 2
    assert out["max_rel_diff"] < 1e-10
