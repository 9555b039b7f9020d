"""The experiment's report from its finished runs: Table 1, the detections, the plots.

:func:`summarize` scores every finished run (:mod:`keras_hesstrace.experiments.scoring`)
and writes: ``summary.csv`` / ``summary.md`` (Table 1 of the paper: detection epoch mean
+- sd, alert rate with its Wilson interval, h, Hedges' g with its noncentral t interval,
clean test accuracy, then each cell's calibration diagnostics and the first-order
baselines' side-by-side table), ``detections.csv`` (one row per run and group),
``comparison.csv`` and ``stops.csv`` (:mod:`keras_hesstrace.experiments.comparison`) and
two PNG plots per cell and monitored group (:func:`plot_cell`).
"""

import io
import os

import numpy as np

from keras_hesstrace.experiments.config import cells, steps_per_epoch
from keras_hesstrace.experiments.scoring import detections, scale_name
from keras_hesstrace.experiments.storage import log
from keras_hesstrace.files import atomic_write_text


SUMMARY_COLUMNS = [
    "arch", "dataset", "group", "noise_rate", "n_runs", "n_alerts", "alert_rate",
    "alert_rate_low", "alert_rate_high", "det_epoch_mean", "det_epoch_sd", "det_epoch_median",
    "h", "target_false_alarm", "target_arl0", "expected_false_alarm", "hedges_g", "hedges_g_low", "hedges_g_high",
    "test_acc_mean", "test_acc_sd", "train_acc_mean", "memorised_mean", "runs_source",
]
DETECTION_COLUMNS = [
    "cell", "arch", "dataset", "run_id", "role", "noise_rate", "seed", "group", "n_snapshots",
    "n_floored", "alert", "alert_snapshot", "alert_step", "alert_epoch", "window_mean", "test_accuracy",
    "train_accuracy", "memorised_fraction", "wall_time_s",
]


def _summary_rows(config, cal, records):
    from keras_hesstrace import stats

    rows = []
    for g in config.monitor:
        recs = [r for r in records if r["group"] == g]
        clean_all = [r for r in recs if r["noise_rate"] == 0.0]
        calib = [r for r in recs if r["role"] == "calibration"]
        heldout = [r for r in recs if r["role"] == "clean"]
        for rate in [0.0] + sorted(float(x) for x in config.noise_rates):
            if rate == 0.0:
                group_runs, source = (heldout, "heldout") if heldout else (calib, "loo")
                ref = calib if heldout else []
            else:
                group_runs = [r for r in recs if r["noise_rate"] == rate]
                source, ref = "noisy", clean_all
            if not group_runs:
                continue
            times = [r["alert_epoch"] if r["alert"] else None for r in group_runs]
            s = stats.run_length_summary(times, confidence=cal.confidence)
            d = lo_d = hi_d = float("nan")
            a = [r["window_mean"] for r in group_runs if np.isfinite(r["window_mean"])]
            b = [r["window_mean"] for r in ref if np.isfinite(r["window_mean"])]
            if len(a) >= 2 and len(b) >= 2:
                try:
                    e = stats.hedges_g(a, b)
                    d, lo_d, hi_d = e.g, e.low, e.high
                except ValueError:
                    pass
            acc = np.array([r["test_accuracy"] for r in group_runs])
            gc = cal[g]
            rows.append({
                "arch": group_runs[0]["arch"], "dataset": group_runs[0]["dataset"], "group": g,
                "noise_rate": rate, "n_runs": s.n_runs, "n_alerts": s.n_alerts,
                "alert_rate": s.alert_rate, "alert_rate_low": s.alert_rate_low,
                "alert_rate_high": s.alert_rate_high, "det_epoch_mean": s.mean,
                "det_epoch_sd": s.sd, "det_epoch_median": s.median, "h": gc.threshold,
                "target_false_alarm": _or_nan(cal.false_alarm_prob),
                "target_arl0": _or_nan(cal.target_arl0),
                "expected_false_alarm": (gc.false_alarm_prob if cal.target == "false_alarm_prob"
                                         else gc.expected_false_alarm_prob(
                                             group_runs[0]["n_snapshots"])),
                "hedges_g": d, "hedges_g_low": lo_d, "hedges_g_high": hi_d,
                "test_acc_mean": float(acc.mean()),
                "test_acc_sd": float(acc.std(ddof=1)) if acc.size > 1 else float("nan"),
                "train_acc_mean": float(np.mean([r["train_accuracy"] for r in group_runs])),
                "memorised_mean": (float(np.nanmean([r["memorised_fraction"] for r in group_runs]))
                                   if rate > 0 else float("nan")),
                "runs_source": source,
            })
    return rows


def _or_nan(v):
    return float("nan") if v is None else float(v)


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return format(v, spec)


def summary_markdown(frame, calibrations, config):
    """Table 1 as markdown, then each cell's calibration diagnostics."""
    lines = [
        f"# Memorisation experiment `{config.name}`",
        "",
        "| arch | dataset | group | η | runs | det. epoch (mean ± sd) | alert rate [95% Wilson] "
        "| h | Hedges' g [95% noncentral t] | clean test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        det = (f"{_fmt(r.det_epoch_mean, '.1f')} ± {_fmt(r.det_epoch_sd, '.1f')}"
               if r.n_alerts else "–")
        rate = (f"{r.alert_rate:.2f} [{r.alert_rate_low:.2f}, {r.alert_rate_high:.2f}]"
                f" ({int(r.n_alerts)}/{int(r.n_runs)})")
        d = (f"{_fmt(r.hedges_g, '.2f')} [{_fmt(r.hedges_g_low, '.2f')}, "
             f"{_fmt(r.hedges_g_high, '.2f')}]")
        acc = f"{r.test_acc_mean:.3f} ± {_fmt(r.test_acc_sd, '.3f')}"
        lines.append(f"| {r.arch} | {r.dataset} | {r.group} | {r.noise_rate:.1f} | "
                     f"{int(r.n_runs)} | {det} | {rate} | {r.h:.2f} | {d} | {acc} |")
    lo, hi = config.window()
    lines += [
        "",
        f"The rule standardises the {scale_name(config)} of the group in each row. "
        "Detection epoch: training epochs completed at the first alert (step / steps per "
        "epoch), over the runs that alerted. η = 0 rows: held-out clean runs standardised "
        "with the baseline of the calibration runs (alert rate = false-alarm rate); "
        f"η > 0 rows: noisy runs (alert rate = power). Hedges' g (bias-corrected d) on the mean "
        f"{scale_name(config)} over epochs {lo:g}–{hi:g}, "
        "noisy runs vs all clean runs (η = 0: held-out vs calibration runs).",
        "",
        "## Calibration",
        "",
        "| cell | group | h | target | achieved | h range giving it | LOO false alarms "
        "[Wilson] | lag-1 r (p) | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, cal in calibrations.items():
        for g in cal.groups:
            lines.append(_calibration_row(cell, cal, cal[g]))
    return "\n".join(lines) + "\n"


def _calibration_row(cell, cal, r):
    """One markdown row of the calibration table, per-run or ARL0 calibration."""
    if cal.target == "false_alarm_prob":
        lo, hi = r.false_alarm_prob_interval
        target = f"per-run false alarm {cal.false_alarm_prob:g} (T = {r.horizon})"
        achieved = f"{r.achieved_false_alarm_prob:.3f} [{lo:.3f}, {hi:.3f}] over calibration sets"
    else:
        target = f"ARL0 {cal.target_arl0:g}"
        achieved = f"ARL0 {r.arl0:.0f}; per run {r.false_alarm_prob:.3f} (T = {r.horizon})"
    span = ("–" if r.threshold_range is None else
            f"[{r.threshold_range[0]:.3f}, {_fmt(r.threshold_range[1], '.3f')})")
    return (f"| {cell} | {r.group} | {r.threshold:.3f} | {target} | {achieved} | {span} | "
            f"{r.loo_false_alarms}/{r.n_runs} [{r.loo_false_alarm_ci[0]:.2f}, "
            f"{r.loo_false_alarm_ci[1]:.2f}] | {r.lag1_r:.2f} ({r.lag1_pvalue:.2g}) | "
            f"{r.n_runs} |")


def summarize(config, out, progress=True):
    """Write detections.csv, summary.csv, summary.md, comparison.csv, stops.csv and the
    plots from finished runs.

    Only runs with ``result.json`` are read. Returns the summary DataFrame.
    """
    import pandas as pd

    from keras_hesstrace.monitor import Calibration

    from keras_hesstrace.experiments.baselines import method_records
    from keras_hesstrace.experiments.comparison import (
        comparison_frame,
        comparison_markdown,
        plot_comparison,
    )

    out = os.fspath(out)
    all_rows, all_records, calibrations, stops = [], [], {}, []
    for arch, dataset in cells(config):
        cal_path = os.path.join(out, f"{arch}-{dataset}", "calibration.json")
        if not os.path.exists(cal_path):
            continue
        cal = Calibration.load(cal_path)
        calibrations[f"{arch}-{dataset}"] = cal
        records = detections(config, out, arch, dataset, cal)
        all_records += records
        all_rows += _summary_rows(config, cal, records)
        stops += method_records(config, out, arch, dataset, records)[0]
        plot_cell(config, out, arch, dataset, cal, records)
    frame = pd.DataFrame(all_rows, columns=SUMMARY_COLUMNS)
    det = pd.DataFrame([{k: r[k] for k in DETECTION_COLUMNS} for r in all_records],
                       columns=DETECTION_COLUMNS)
    buf = io.StringIO()
    det.to_csv(buf, index=False)
    atomic_write_text(os.path.join(out, "detections.csv"), buf.getvalue())
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    atomic_write_text(os.path.join(out, "summary.csv"), buf.getvalue())
    md = summary_markdown(frame, calibrations, config)
    if stops:
        compared = comparison_frame(config, stops, confidence=0.95)
        for name, table in (("comparison.csv", compared), ("stops.csv", pd.DataFrame(stops))):
            buf = io.StringIO()
            table.to_csv(buf, index=False)
            atomic_write_text(os.path.join(out, name), buf.getvalue())
        md += "\n## First-order baselines on the same runs\n\n" + comparison_markdown(config, compared)
        os.makedirs(os.path.join(out, "plots"), exist_ok=True)
        plot_comparison(config, compared, os.path.join(out, "plots", "comparison.png"))
    atomic_write_text(os.path.join(out, "summary.md"), md)
    if progress:
        log("\n" + md)
        log(f"wrote {os.path.join(out, 'summary.md')}, summary.csv, detections.csv, "
             f"comparison.csv, stops.csv and plots/ in {out}")
    return frame


# ------------------------------------------------------------------------------ plots


def plot_cell(config, out, arch, dataset, cal, records):
    """Two PNGs per monitored group: trajectories with alerts, and the PH statistic."""
    import matplotlib

    from keras_hesstrace.plots import new_figure, save_figure

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    rates = sorted(float(x) for x in config.noise_rates)
    cmap = matplotlib.colormaps["autumn_r"]
    colour = {r: cmap(0.35 + 0.65 * i / max(len(rates) - 1, 1)) for i, r in enumerate(rates)}
    paths = []
    log = config.transform == "log"

    def shown(y):  # the rule's scale back on the trace's scale (a ratio with a reference)
        return np.exp(y) if log else y

    for g in config.monitor:
        recs = [r for r in records if r["group"] == g]
        base = cal[g].baseline
        fig = new_figure(figsize=(9, 5.5))
        ax = fig.subplots()
        seen = set()

        def label(key, text):
            if key in seen:
                return None
            seen.add(key)
            return text

        for r in recs:
            if r["role"] == "calibration":
                kw = dict(color="0.6", lw=0.8, alpha=0.8,
                          label=label("cal", f"clean, calibration ({cal[g].n_runs} runs)"))
            elif r["role"] == "clean":
                kw = dict(color="tab:blue", lw=1.2,
                          label=label("clean", "clean, held out"))
            else:
                kw = dict(color=colour[r["noise_rate"]], lw=1.2,
                          label=label(r["noise_rate"], f"noisy η = {r['noise_rate']:.1f}"))
            ax.plot(r["_epochs"], shown(r["_scale"]), **kw)
            if r["alert"] and r["role"] != "calibration":
                i = r["alert_snapshot"]
                ax.plot(r["_epochs"][i], shown(r["_scale"][i]), marker="v", ms=9,
                        color=kw["color"], mec="black", zorder=5,
                        label=label("alert", "first alert"))
        spe_epochs = recs[0]["_epochs"][: len(base)] if recs else None
        if spe_epochs is not None and len(spe_epochs) == len(base):
            lo, hi = shown(base.mean - 2 * base.std), shown(base.mean + 2 * base.std)
            mid = shown(base.mean)
            ax.fill_between(spe_epochs, lo, hi, color="0.85", alpha=0.6, zorder=0,
                            label="clean baseline ± 2 sd")
            ax.plot(spe_epochs, mid, color="black", lw=1, ls="--", label="clean baseline mean")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        what = "model" if g == "total" else f"layer '{g}'"
        floor = (f"; floored at {config.log_floor:g}" if log and config.log_floor is not None
                 else "")
        if config.reference_snapshot is None:
            ax.set_ylabel(f"Hessian trace of {what} (fixed batch){floor}")
        else:
            at = config.reference_snapshot * config.every_n_steps / steps_per_epoch(config, dataset)
            ax.set_ylabel(f"Hessian trace of {what} "
                          + ("/" if log else "−") + f" the run's own at epoch {at:g}{floor}")
        ax.set_title(f"{arch} on {dataset}: clean vs noisy-label runs; triangles = first "
                     f"alert (h = {cal[g].threshold:.2f})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        paths.append(save_figure(
            fig, os.path.join(out, "plots", f"{arch}-{dataset}-{_safe(g)}-trajectories.png"), dpi=110))

        fig = new_figure(figsize=(9, 5))
        ax = fig.subplots()
        seen.clear()
        h = cal[g].threshold
        for r in recs:
            if r["role"] == "calibration":
                continue
            if r["role"] == "clean":
                kw = dict(color="tab:blue", lw=1.2, label=label("clean", "clean, held out"))
            else:
                kw = dict(color=colour[r["noise_rate"]], lw=1.2,
                          label=label(r["noise_rate"], f"noisy η = {r['noise_rate']:.1f}"))
            ax.plot(r["_epochs"], r["_statistic"], **kw)
            if r["alert"]:
                i = r["alert_snapshot"]
                ax.plot(r["_epochs"][i], r["_statistic"][i], marker="v", ms=9,
                        color=kw["color"], mec="black", zorder=5,
                        label=label("alert", "first alert"))
        ax.axhline(h, color="black", ls="--", lw=1.2, label=f"threshold h = {h:.2f}")
        ax.set_ylim(0, 4 * h)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Page–Hinkley statistic max(g⁺, g⁻)")
        ax.set_title(f"{arch} on {dataset}, group '{g}': detection statistic of the Phase II "
                     "runs (axis cut at 4h)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        paths.append(save_figure(
            fig, os.path.join(out, "plots", f"{arch}-{dataset}-{_safe(g)}-statistic.png"), dpi=110))
    return paths


def _safe(name):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
