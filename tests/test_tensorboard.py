"""Issue 15: what HessianTraceCallback writes to TensorBoard and prints, as TensorBoard
itself (its event reader, and a real server's HTTP API) shows it."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from keras_hesstrace.monitor.baseline import Baseline
from keras_hesstrace.monitor.callback import HessianTraceCallback
from keras_hesstrace.monitor.page_hinkley import PageHinkley
from models_for_tests import training_classifier as small_model
from models_for_tests import training_data as data

pytest.importorskip("tensorboard")

FIT = dict(batch_size=16, shuffle=False)  # 64 examples: 4 steps an epoch
H = 1.0


def alerting_detector():
    """Quiet at snapshot 0 (a huge sd), far out from snapshot 1 on: alerts at step 2,
    in the middle of the first epoch."""
    return PageHinkley(delta=0.0, threshold=H,
                       baseline=Baseline(np.zeros(5), np.array([1e12] + [1e-6] * 4)))


def fit(tmp_path, verbose=0, detector=True, epochs=1, summary=True):
    x, y = data()
    cb = HessianTraceCallback((x[:32], y[:32]), every_n_steps=2, num_probes=2, groups=["head"],
                              detector={"head": alerting_detector()} if detector else None,
                              log_dir=tmp_path / "logs", csv_path=tmp_path / "t.csv", verbose=1,
                              summary=summary)
    small_model().fit(x, y, epochs=epochs, verbose=verbose, callbacks=[cb], **FIT)
    return cb


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: (acc.SummaryMetadata(tag), acc.Tensors(tag)) for tag in acc.Tags()["tensors"]}


def test_threshold_layout_descriptions_and_alert_text(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    fit(tmp_path)
    events = read_events(tmp_path / "logs")
    scalars = {t for t, (m, _) in events.items() if m.plugin_data.plugin_name == "scalars"}
    assert scalars == {"hessian_trace/head", "hessian_trace/total", "hessian_trace_detector/head",
                       "hessian_trace_threshold/head"}  # no smeared 0/1 alert scalar
    for tag in scalars:
        assert events[tag][0].summary_description, tag  # every tag has a description
    value = {t: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events[t][1]} for t in scalars}
    assert value["hessian_trace_threshold/head"] == {0: H, 2: H, 4: H}  # x = optimiser step
    assert value["hessian_trace_detector/head"][0] < H < value["hessian_trace_detector/head"][2]
    # The alert: one text entry at its step, naming group, step, epoch, statistic and h.
    meta, texts = events["hessian_trace_alerts"]
    assert meta.plugin_data.plugin_name == "text" and [e.step for e in texts] == [2]
    text = tf.make_ndarray(texts[0].tensor_proto).item().decode()
    assert re.fullmatch(r"HessianTraceCallback: alert on group 'head' at step 2 \(epoch 0\.50\): "
                        r"statistic \S+ > h = 1\.000\.", text), text
    # The custom-scalars layout: statistic and h on one chart.
    meta, layouts = events["custom_scalars__config__"]
    assert meta.plugin_data.plugin_name == "custom_scalars" and len(layouts) == 1
    layout = layout_pb2.Layout.FromString(tf.make_ndarray(layouts[0].tensor_proto).item())
    (category,) = layout.category
    (chart,) = category.chart
    assert list(chart.multiline.tag) == ["^hessian_trace_detector/head$",
                                         "^hessian_trace_threshold/head$"]


def test_alert_and_summary_lines_keep_the_progress_bar_whole(tmp_path, capsys):
    fit(tmp_path, verbose=1)
    out = capsys.readouterr().out
    lines = out.split("\n")
    alert = [line for line in lines if "alert on group" in line]
    # Printed mid-epoch (step 2 of 4): on a line of its own, not glued to the bar.
    assert len(alert) == 1 and alert[0].startswith("HessianTraceCallback: alert on group 'head'")
    summary = [line for line in lines if "snapshots this fit" in line]
    assert summary == ["HessianTraceCallback: 3 snapshots this fit (steps 0..4, every 2); "
                       + summary[0].split("; ", 1)[1]]
    assert "1 group(s) + total; last traces: total " in summary[0]
    assert "ALERT: 'head' at step 2 (epoch 0.50)." in summary[0]


def test_summary_line_without_a_detector(tmp_path, capsys):
    fit(tmp_path, detector=False)
    out = capsys.readouterr().out
    (summary,) = [line for line in out.splitlines() if "snapshots this fit" in line]
    assert summary.endswith("; no detector.") and "head " in summary


def test_summary_false_keeps_the_alert_line_only(tmp_path, capsys):
    """A loop calling fit once an epoch (the runner, the demo) prints its own progress."""
    fit(tmp_path, summary=False)
    out = capsys.readouterr().out
    assert "snapshots this fit" not in out
    assert "HessianTraceCallback: alert on group 'head' at step 2" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read().decode())


def test_a_real_tensorboard_server_shows_the_scalars_threshold_and_layout(tmp_path):
    fit(tmp_path, epochs=2)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
                if "hessian_trace_threshold/head" in tags.get("train", {}):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert "train" in tags, tags
        run = tags["train"]
        assert {"hessian_trace/head", "hessian_trace/total", "hessian_trace_detector/head",
                "hessian_trace_threshold/head"} <= set(run)
        assert "Threshold h" in run["hessian_trace_threshold/head"]["description"]

        def series(tag):
            query = urllib.parse.urlencode({"run": "train", "tag": tag})
            return {step: value for _, step, value in _get(port, f"/data/plugin/scalars/scalars?{query}")}

        threshold = series("hessian_trace_threshold/head")
        assert threshold == {s: H for s in (0, 2, 4, 6, 8)}  # x = optimiser step
        assert set(series("hessian_trace/head")) == set(threshold)
        layout = _get(port, "/data/plugin/custom_scalars/layout")
        charts = [c for cat in layout["category"] for c in cat["chart"]]
        assert [c["multiline"]["tag"] for c in charts] == [
            ["^hessian_trace_detector/head$", "^hessian_trace_threshold/head$"]]
        texts = _get(port, "/data/plugin/text/tags")
        assert "hessian_trace_alerts" in texts.get("train", [])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
