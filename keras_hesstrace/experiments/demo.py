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


def demo_caption(config, cal, phase1, noisy):
    """The demo figure's caption: the data, model, training, snapshot and rule settings."""
    r = cal["head"]
    data = "scikit-learn's 8x8 digits" + (f" ({config.train_examples} training examples)"
                                          if config.train_examples else "")
    seeds = ", ".join(str(s.seed) for s in phase1)
    return (f"{config.archs[0]} on {data}, {config.epochs} epochs, batch {config.batch_size}, SGD lr "
            f"{config.learning_rate:g} momentum {config.momentum:g} weight decay {config.weight_decay:g}, "
            f"loss sparse categorical cross-entropy · traces every {config.every_n_steps} steps, "
            f"{config.num_probes} Rademacher probes on a fixed batch of {config.probe_batch_size} training "
            f"images (band and shading: ±1 sd / ±1 SE) · calibration: {len(phase1)} clean runs (seeds {seeds}), "
            f"{config.transform or 'raw'} trace floored at {config.log_floor:g}, Page–Hinkley δ = {cal.delta:.3g}, "
            f"h = {r.threshold:.3g} for an in-control run length of {config.target_arl0:g} snapshots · "
            f"monitored run: η = {noisy.noise_rate:g} symmetric label noise, seed {noisy.seed}")


def _plot_demo(path, config, cal, out, phase1, noisy, frame, spe, alert_step):
    """demo.png: the head trace against the clean band, the rule's statistic against h, every layer.

    Returns the Figure (already written to ``path``).
    """
    import matplotlib
    import pandas as pd
    from matplotlib import ticker

    from keras_hesstrace.plots import add_caption, new_figure, save_figure

    r = cal["head"]
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    def plain_minor(ax):
        """Minor log ticks labelled at 2 and 5 x 10^k, only while the axis spans under three decades."""
        def label(v, _):
            lo, hi = ax.get_ylim()
            if v <= 0 or lo <= 0 or np.log10(hi / lo) >= 3:
                return ""
            mantissa = round(v / 10 ** np.floor(np.log10(v)))
            return f"{v:g}" if mantissa in (2, 5) else ""
        return ticker.FuncFormatter(label)
    fig = new_figure(figsize=(9, 12))
    axes = fig.subplots(3, 1, sharex=True)

    # 1. The head layer's trace: the clean runs thin and grey, their band, the noisy run.
    ax = axes[0]
    clean_steps = None
    for i, spec in enumerate(phase1):
        steps, values = read_trajectory(
            os.path.join(run_folder(out, spec), "traces.csv"), "head")
        clean_steps = steps if clean_steps is None or len(steps) > len(clean_steps) else clean_steps
        ax.plot(steps / spe, values, color="0.55", lw=0.8, alpha=0.8,
                label=f"clean runs ({len(phase1)}, calibration)" if i == 0 else None)
    base = r.baseline
    n = min(len(base.mean), len(clean_steps))
    mean, sd = np.asarray(base.mean[:n], float), np.asarray(base.std[:n], float)
    if base.transform == "log":
        centre, lo, hi = np.exp(mean), np.exp(mean - sd), np.exp(mean + sd)
    else:
        centre, lo, hi = mean, mean - sd, mean + sd
    x_band = clean_steps[:n] / spe
    ax.fill_between(x_band, lo, hi, color="tab:blue", alpha=0.18, lw=0,
                    label="clean band: baseline mean ± 1 sd" + (" (of log trace)" if base.transform == "log" else ""))
    ax.plot(x_band, centre, color="tab:blue", lw=1.4, label="clean baseline mean")
    head = frame[frame["group"] == "head"].sort_values("step")
    x = head["step"].to_numpy() / spe
    tr = head["trace"].to_numpy(dtype=float)
    se = head["stderr"].to_numpy(dtype=float) if "stderr" in head else np.zeros_like(tr)
    positive = tr[np.isfinite(tr) & (tr > 0)]
    bottom = float(min(positive.min(), np.nanmin(lo[lo > 0]) if np.any(lo > 0) else positive.min())) / 2 if positive.size else 1e-3
    ax.fill_between(x, np.maximum(tr - se, bottom), tr + se, color="tab:red", alpha=0.2, lw=0,
                    label="noisy run ± 1 SE (probes)")
    ax.plot(x, tr, color="tab:red", lw=1.8, label=f"noisy labels, η = {noisy.noise_rate:.1f}")
    if config.log_floor is not None and config.log_floor > bottom:
        ax.axhline(config.log_floor, color="0.3", lw=0.8, ls=":",
                   label=f"floor {config.log_floor:g} (smaller traces count as it)")
    if alert_step is not None:
        v = float(head.loc[head["step"] == alert_step, "trace"].iloc[0])
        ax.plot(alert_step / spe, v, "v", ms=12, color="tab:red", mec="black", zorder=5,
                label=f"alert: step {alert_step} (epoch {alert_step / spe:.1f})")
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain_minor(ax))
    ax.set_ylabel("Hessian trace, layer 'head' (log scale)")
    k = min(len(tr), n) - 1
    ratio = tr[k] / centre[k] if k >= 0 and centre[k] > 0 else float("nan")
    ax.set_title(f"Head-layer Hessian trace: the noisy run ends at {ratio:.3g}× the clean mean "
                 f"(epoch {x[k]:.1f})", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left", ncol=2)
    ax.grid(True, alpha=0.3, which="both")

    # 2. The Page-Hinkley statistic against h.
    ax = axes[1]
    stat = np.maximum(head["g_pos"].astype(float), head["g_neg"].astype(float)).to_numpy()
    h = r.threshold
    top = float(np.nanmax(stat)) if np.isfinite(stat).any() else h
    ax.axhline(h, color="black", ls="--", label=f"threshold h = {h:.3g}")
    if top <= 10 * h:
        ax.plot(x, stat, color="tab:red", lw=1.5, marker=".", ms=4, label="max(g⁺, g⁻), noisy run")
        ax.set_ylim(0, max(1.15 * top, 1.5 * h))
        scale = ""
    else:
        floor = h / 100
        ax.plot(x, np.maximum(stat, floor), color="tab:red", lw=1.5, marker=".", ms=4,
                label=f"max(g⁺, g⁻), noisy run (values < {floor:.2g} drawn at the axis floor)")
        ax.set_yscale("log")
        ax.set_ylim(floor, 2 * top)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain_minor(ax))
        scale = " (log scale)"
    ax.annotate(f"h = {h:.3g}", (x[0], h), xytext=(2, 3), textcoords="offset points", fontsize=8)
    if alert_step is not None:
        ax.axvline(alert_step / spe, color="tab:red", ls=":", lw=1)
        sa = float(stat[head["step"].to_numpy() == alert_step][0])
        ax.plot(alert_step / spe, sa if scale == "" else max(sa, h / 100), "v", ms=11, color="tab:red", mec="black",
                zorder=5, label=f"alert: first snapshot past h (step {alert_step}, epoch {alert_step / spe:.1f})")
        title = (f"Page–Hinkley statistic: alert at step {alert_step} (epoch {alert_step / spe:.1f}); "
                 f"it reaches {top:.3g} = {top / h:.3g}h")
    else:
        title = f"Page–Hinkley statistic: no alert in {len(stat)} snapshots (largest {top:.3g} < h = {h:.3g})"
    ax.set_ylabel("Page–Hinkley statistic" + scale)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(True, alpha=0.3, which="both")

    # 3. Every layer, noisy (solid, ±1 SE) and one clean run (dashed).
    ax = axes[2]
    clean = pd.read_csv(os.path.join(run_folder(out, phase1[0]), "traces.csv"))
    colours = matplotlib.colormaps["tab10"]
    hidden = 0
    for k, g in enumerate(dict.fromkeys(frame["group"])):
        f = frame[frame["group"] == g].sort_values("step")
        c = clean[clean["group"] == g].sort_values("step")
        fv, cv = f["trace"].to_numpy(dtype=float), c["trace"].to_numpy(dtype=float)
        hidden += int(np.sum(fv <= 0) + np.sum(cv <= 0))
        fx = f["step"].to_numpy() / spe
        if "stderr" in f:
            fse = f["stderr"].to_numpy(dtype=float)
            ax.fill_between(fx, np.where(fv - fse > 0, fv - fse, np.nan), fv + fse, color=colours(k), alpha=0.15, lw=0)
        ax.plot(fx, np.where(fv > 0, fv, np.nan), color=colours(k), lw=1.5, label=f"{g} (noisy)")
        ax.plot(c["step"] / spe, np.where(cv > 0, cv, np.nan), color=colours(k), lw=1, ls="--",
                label=f"{g} (clean seed {phase1[0].seed})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain_minor(ax))
    ax.set_xlabel("epoch")
    ax.set_ylabel("Hessian trace per layer (log scale)")
    ax.set_title("Every layer's trace from the same probes (solid: noisy run ± 1 SE, dashed: a clean run)"
                 + (f"; {hidden} estimates ≤ 0 not drawn" if hidden else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(True, alpha=0.3, which="both")
    add_caption(fig, demo_caption(config, cal, phase1, noisy))
    save_figure(fig, path, dpi=100)
    return fig
