"""The offline demo: calibrate the alert on a few clean runs, then watch a noisy-label run.

Everything runs on scikit-learn's bundled 8x8 digits with the small CNN, so it needs no
download and no GPU: ``keras-hesstrace demo`` (3.5 minutes measured on 2 shared CPU cores at the
defaults). It is the memorisation experiment in miniature, built from the same pieces
(:mod:`keras_hesstrace.experiments.runner` and the modules it uses), with the alert raised
online by :class:`~keras_hesstrace.monitor.HessianTraceCallback` during the noisy run's
``fit``.
"""

import os
import sys

import numpy as np

from keras_hesstrace.experiments.config import ExperimentConfig, cells, run_specs
from keras_hesstrace.experiments.scoring import calibrate_cell
from keras_hesstrace.experiments.storage import check_config, read_trajectory, run_folder
from keras_hesstrace.experiments.training import train_run


def demo_config(epochs=10, clean_runs=4, noise_rate=0.4, every_n_steps=22, num_probes=10,
                train_examples=None, probe_batch_size=256, target_arl0=250.0):
    """The demo's ``ExperimentConfig``: ``clean_runs`` calibration runs, one noisy run."""
    return ExperimentConfig(
        name="demo", archs=["small_cnn"], datasets=["digits"], noise_rates=[noise_rate],
        calibration_runs=clean_runs, heldout_clean_runs=0, noisy_runs=1, epochs=epochs,
        batch_size=32, learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
        schedule="constant", every_n_steps=every_n_steps, num_probes=num_probes,
        probe_batch_size=probe_batch_size, monitor=["head"], transform="log",
        log_floor=0.05, false_alarm_prob=None, target_arl0=target_arl0,
        train_examples=train_examples,
        tensorboard=True, n_resamples=2000,
    ).validate()


def _floored_detector(cal, group, floor):
    """The calibration's detector for ``group``, flooring values as the runner does."""
    from keras_hesstrace.monitor import PageHinkley

    class FlooredPageHinkley(PageHinkley):
        def update(self, value, step=None):
            if floor is not None and np.isfinite(value):
                value = max(float(value), floor)
            return super().update(value, step)

    r = cal[group]
    return FlooredPageHinkley(delta=cal.delta, threshold=r.threshold, baseline=r.baseline)


def run_demo(out="hesstrace-demo", epochs=10, clean_runs=4, noise_rate=0.4, every_n_steps=22,
             num_probes=10, train_examples=None, probe_batch_size=256, stream=None):
    """Calibrate on clean runs, run a noisy one with the live alert; print and write results.

    Args:
        out: output folder (CSV per run, TensorBoard logs, calibration JSON, PNG). A rerun
            with the same settings reuses finished runs; other settings are refused.
        epochs: epochs per run.
        clean_runs: Phase I clean runs (>= 3).
        noise_rate: symmetric label noise of the monitored run.
        every_n_steps, num_probes, probe_batch_size: the trace snapshots.
        train_examples: train on a subset (a smaller budget; tests use it).
        stream: where to print (default stdout).

    Returns:
        dict: ``alert_step``, ``alert_epoch`` (None without an alert), ``threshold``,
        ``paths`` (csv, calibration, tensorboard, png), ``table`` (pandas DataFrame of the
        noisy run's per-layer traces at each epoch end).
    """
    import pandas as pd

    stream = stream or sys.stdout

    def say(msg=""):
        print(msg, file=stream, flush=True)

    config = demo_config(epochs, clean_runs, noise_rate, every_n_steps, num_probes,
                         train_examples, probe_batch_size)
    out = os.fspath(out)
    check_config(out, config)
    (arch, dataset), = cells(config)
    phase1, phase2 = run_specs(config, arch, dataset)
    noisy = phase2[0]
    tb_root = os.path.join(out, "tensorboard")
    say(f"keras-hesstrace demo: a small CNN on scikit-learn's bundled 8x8 digits, "
        f"{epochs} epochs per run, the Hessian trace of every layer every {every_n_steps} "
        f"steps ({num_probes} probes on a fixed batch of {probe_batch_size} training images).")
    say(f"Phase I: {clean_runs} clean-label runs give the baseline and the alert threshold.")
    for i, spec in enumerate(phase1, 1):
        say(f"[{i}/{clean_runs + 1}] clean run, seed {spec.seed}")
        train_run(config, spec, run_folder(out, spec),
                  log_dir=os.path.join(tb_root, spec.run_id), prefix="    ")
    cal = calibrate_cell(config, out, arch, dataset)
    r = cal["head"]
    say(f"Calibrated: h = {r.threshold:.2f} for an in-control run length of "
        f"{config.target_arl0:g} snapshots (expected false-alarm probability per run "
        f"{r.false_alarm_prob:.2f}).")
    say(f"Phase II: [{clean_runs + 1}/{clean_runs + 1}] a run with {noise_rate:.0%} of the "
        "training labels corrupted, watched live by HessianTraceCallback:")
    detector = {"head": _floored_detector(cal, "head", config.log_floor)}
    res = train_run(config, noisy, run_folder(out, noisy), detector=detector,
                    log_dir=os.path.join(tb_root, noisy.run_id), prefix="    ")

    csv_path = os.path.join(run_folder(out, noisy), "traces.csv")
    frame = pd.read_csv(csv_path)
    spe = res["steps_per_epoch"]
    wide = frame.pivot(index="step", columns="group", values="trace")
    # The callback records every layer and the total over all variables ("total").
    layers = [g for g in dict.fromkeys(frame["group"]) if g != "total"]
    head = frame[frame["group"] == "head"].set_index("step")
    base = r.baseline
    mean_clean = np.exp(base.mean) if base.transform == "log" else base.mean
    table = wide[layers].copy()
    table.insert(0, "epoch", table.index / spe)
    table["total trace"] = wide["total"]
    table["head, clean mean"] = mean_clean[: len(table)]
    table["PH statistic"] = np.maximum(head["g_pos"], head["g_neg"]).to_numpy()
    alerts = head[head["alert"].astype(float) > 0]
    alert_step = int(alerts.index[0]) if len(alerts) else None
    at_epoch_end = table[(table.index % spe == 0)]
    say("")
    say(f"Per-layer Hessian traces of the noisy run at each epoch end (layer traces sum to "
        f"the total; h = {r.threshold:.2f}):")
    say(at_epoch_end.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    say("")
    if alert_step is None:
        say(f"No alert within {epochs} epochs.")
    else:
        say(f"ALERT: the Page-Hinkley rule fired at step {alert_step} (epoch "
            f"{alert_step / spe:.1f}): the head layer's curvature left the clean band, the "
            "signature of memorising noisy labels.")
    say(f"Noisy run: clean test accuracy {res['test_accuracy']:.3f}, accuracy on the noisy "
        f"training labels {res['train_accuracy']:.3f}, corrupted labels memorised "
        f"{res['memorised_fraction']:.0%}.")

    png = os.path.join(out, "demo.png")
    _plot_demo(png, config, cal, out, phase1, noisy, frame, spe, alert_step)
    say("")
    say("Where the results are:")
    say(f"  traces (CSV, one row per snapshot and layer): {csv_path}")
    say(f"      import pandas as pd; pd.read_csv({csv_path!r})")
    say(f"  clean runs' traces: {os.path.join(out, arch + '-' + dataset, 'runs')}/calibration-*/traces.csv")
    say(f"  calibration (threshold and baseline, JSON): "
        f"{os.path.join(out, arch + '-' + dataset, 'calibration.json')}")
    say(f"  TensorBoard: tensorboard --logdir {tb_root}   (then open http://localhost:6006)")
    say(f"  plot: {png}")
    return {"alert_step": alert_step,
            "alert_epoch": None if alert_step is None else alert_step / spe,
            "threshold": r.threshold, "table": at_epoch_end, "result": res,
            "paths": {"csv": csv_path, "tensorboard": tb_root, "png": png,
                      "calibration": os.path.join(out, arch + "-" + dataset,
                                                  "calibration.json")}}


def _plot_demo(path, config, cal, out, phase1, noisy, frame, spe, alert_step):
    import matplotlib
    import pandas as pd

    from keras_hesstrace.plots import new_figure, save_figure

    r = cal["head"]
    fig = new_figure(figsize=(9, 11.5))
    axes = fig.subplots(3, 1, sharex=True)
    ax = axes[0]
    for i, spec in enumerate(phase1):
        steps, values = read_trajectory(
            os.path.join(run_folder(out, spec), "traces.csv"), "head")
        ax.plot(steps / spe, values, color="tab:blue", lw=1, alpha=0.7,
                label="clean runs (calibration)" if i == 0 else None)
    head = frame[frame["group"] == "head"].sort_values("step")
    ax.plot(head["step"] / spe, head["trace"], color="tab:red", lw=1.8,
            label=f"noisy labels, η = {noisy.noise_rate:.1f}")
    if alert_step is not None:
        v = float(head.loc[head["step"] == alert_step, "trace"].iloc[0])
        ax.plot(alert_step / spe, v, "v", ms=12, color="tab:red", mec="black", zorder=5,
                label=f"alert (epoch {alert_step / spe:.1f})")
    ax.set_yscale("log")
    ax.set_ylabel("Hessian trace, layer 'head'")
    ax.set_title("Head-layer Hessian trace: clean runs vs a noisy-label run", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = axes[1]
    stat = np.maximum(head["g_pos"].astype(float), head["g_neg"].astype(float))
    ax.plot(head["step"] / spe, stat, color="tab:red", lw=1.5, label="noisy run")
    ax.axhline(r.threshold, color="black", ls="--", label=f"threshold h = {r.threshold:.2f}")
    if alert_step is not None:
        ax.axvline(alert_step / spe, color="tab:red", ls=":", lw=1)
    ax.set_ylim(0, 4 * r.threshold)
    ax.set_ylabel("Page–Hinkley statistic max(g⁺, g⁻)")
    ax.set_title("Detection statistic of the noisy run (the axis stops at 4h; the statistic "
                 "keeps rising)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    clean = pd.read_csv(os.path.join(run_folder(out, phase1[0]), "traces.csv"))
    colours = matplotlib.colormaps["tab10"]
    for k, g in enumerate(dict.fromkeys(frame["group"])):
        f = frame[frame["group"] == g].sort_values("step")
        c = clean[clean["group"] == g].sort_values("step")
        ax.plot(f["step"] / spe, f["trace"], color=colours(k), lw=1.5, label=f"{g} (noisy)")
        ax.plot(c["step"] / spe, c["trace"], color=colours(k), lw=1, ls="--",
                label=f"{g} (clean seed {phase1[0].seed})")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Hessian trace per layer")
    ax.set_title("Every layer's trace from the same probes (solid: noisy run, dashed: a "
                 "clean run)", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(True, alpha=0.3)
    save_figure(fig, path, dpi=100)
