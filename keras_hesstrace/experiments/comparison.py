"""The side-by-side table: the curvature rule beside the first-order baselines.

From :func:`keras_hesstrace.experiments.baselines.method_records` (one record per Phase
II run and method): per method and noise rate, the alert (stop) rate with its Wilson
interval, the detection epoch, and what the stop is worth (clean test accuracy and
memorised share at the stop, beside the oracle stop's and the final accuracy). The η = 0
rows are the held-out clean runs: their alert rate is the false-alarm rate.
"""

import numpy as np

from keras_hesstrace import stats
from keras_hesstrace.experiments.baselines import method_label, methods

COMPARISON_COLUMNS = [
    "cell", "method", "noise_rate", "n_runs", "n_alerts", "alert_rate", "alert_rate_low",
    "alert_rate_high", "det_epoch_mean", "det_epoch_sd", "memorised_at_stop_mean",
    "test_acc_at_stop_mean", "best_test_acc_mean", "final_test_acc_mean",
]


def comparison_frame(config, records, confidence=0.95):
    """pandas DataFrame with ``COMPARISON_COLUMNS``: one row per (cell, method, rate)."""
    import pandas as pd

    rows = []
    for cell in sorted({r["cell"] for r in records}):
        for method in methods(config):
            for rate in [0.0] + sorted(float(x) for x in config.noise_rates):
                rs = [r for r in records if r["cell"] == cell and r["method"] == method
                      and r["noise_rate"] == rate]
                if not rs:
                    continue
                s = stats.run_length_summary([r["alert_epoch"] for r in rs], confidence)
                rows.append({
                    "cell": cell, "method": method, "noise_rate": rate, "n_runs": s.n_runs,
                    "n_alerts": s.n_alerts, "alert_rate": s.alert_rate,
                    "alert_rate_low": s.alert_rate_low, "alert_rate_high": s.alert_rate_high,
                    "det_epoch_mean": s.mean, "det_epoch_sd": s.sd,
                    "memorised_at_stop_mean": _mean(rs, "memorised_at_stop"),
                    "test_acc_at_stop_mean": _mean(rs, "test_accuracy_at_stop"),
                    "best_test_acc_mean": _mean(rs, "best_test_accuracy"),
                    "final_test_acc_mean": _mean(rs, "final_test_accuracy"),
                })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _mean(records, key):
    v = np.array([r[key] for r in records], dtype=np.float64)
    return float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")


def _num(v, spec):
    return "–" if v is None or not np.isfinite(v) else format(v, spec)


def _detection_cell(rate, r):
    frac = f"{int(r.n_alerts)}/{int(r.n_runs)}"
    if rate == 0.0:
        return f"{frac} = {r.alert_rate:.2f} [{r.alert_rate_low:.2f}, {r.alert_rate_high:.2f}]"
    return f"{frac}, {_num(r.det_epoch_mean, '.1f')} ± {_num(r.det_epoch_sd, '.1f')}"


def _worth_cell(rate, r):
    return f"{r.test_acc_at_stop_mean:.3f}, {_num(r.memorised_at_stop_mean, '.2f')}"


def _method_rows(config, sub, rates, cell):
    """Markdown rows, one per method present in ``sub``: ``cell(rate, row)`` per rate
    (η = 0 first), "–" where the method has no row at that rate."""
    lines = []
    for method in methods(config):
        m = sub[sub["method"] == method]
        if m.empty:
            continue
        cells = []
        for rate in [0.0] + rates:
            row = m[m["noise_rate"] == rate]
            cells.append("–" if row.empty else cell(rate, row.iloc[0]))
        lines.append(f"| {method_label(config, method)} | " + " | ".join(cells) + " |")
    return lines


def comparison_markdown(config, frame):
    """Two markdown tables: detection and false alarms; what a stop is worth."""
    rates = sorted(float(x) for x in config.noise_rates)
    lines = []
    for cell in sorted(frame["cell"].unique()):
        sub = frame[frame["cell"] == cell]
        lines += [
            f"### {cell}: the curvature rule beside first-order baselines, on the same runs",
            "",
            "| method | false alarms, held-out clean [95% Wilson] | "
            + " | ".join(f"η = {r:.1f}: alerts, epoch (mean ± sd)" for r in rates) + " |",
            "|---|---|" + "---|" * len(rates),
        ]
        lines += _method_rows(config, sub, rates, _detection_cell)
        lines += [
            "",
            "What a stop is worth (means over runs; read at the end of the epoch the stop "
            "falls in; a run without an alert is trained to the end): clean test accuracy "
            "and memorised share of the corrupted training labels at the stop.",
            "",
            "| method | " + " | ".join(f"η = {r:.1f}: test acc, memorised" for r in [0.0] + rates)
            + " |",
            "|---|" + "---|" * (len(rates) + 1),
        ]
        lines += _method_rows(config, sub, rates, _worth_cell)
        ref = sub[sub["method"] == methods(config)[0]]
        for label, key in (("oracle stop (best epoch)", "best_test_acc_mean"),
                           ("no stop (final epoch)", "final_test_acc_mean")):
            cells = []
            for rate in [0.0] + rates:
                row = ref[ref["noise_rate"] == rate]
                cells.append("–" if row.empty else f"{row.iloc[0][key]:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_comparison(config, frame, path):
    """Three panels per cell: held-out false alarms (Wilson bars), detection epoch by η,
    and clean test accuracy at the stop by η (with the oracle and no-stop accuracies)."""
    from keras_hesstrace.plots import new_figure, save_figure

    rates = sorted(float(x) for x in config.noise_rates)
    names = [m for m in methods(config) if m in set(frame["method"])]
    fig = new_figure(figsize=(15, 5.2))
    ax_fa, ax_det, ax_acc = fig.subplots(1, 3)
    colours = {m: f"C{i}" for i, m in enumerate(names)}
    for i, m in enumerate(names):
        sub = frame[frame["method"] == m].set_index("noise_rate")
        label = method_label(config, m)
        if 0.0 in sub.index:
            r = sub.loc[0.0]
            ax_fa.errorbar([r.alert_rate], [i], xerr=[[r.alert_rate - r.alert_rate_low],
                                                        [r.alert_rate_high - r.alert_rate]],
                           fmt="o", color=colours[m], capsize=3)
        det = [sub.loc[x].det_epoch_mean if x in sub.index else np.nan for x in rates]
        acc = [sub.loc[x].test_acc_at_stop_mean if x in sub.index else np.nan
               for x in [0.0] + rates]
        style = dict(color=colours[m], marker="o", lw=2.2 if i == 0 else 1.2, label=label)
        ax_det.plot(rates, det, **style)
        ax_acc.plot([0.0] + rates, acc, **style)
    ref = frame[frame["method"] == names[0]].set_index("noise_rate") if names else None
    if ref is not None:
        xs = [x for x in [0.0] + rates if x in ref.index]
        ax_acc.plot(xs, [ref.loc[x].best_test_acc_mean for x in xs], color="black", ls="--",
                    label="oracle stop (best epoch)")
        ax_acc.plot(xs, [ref.loc[x].final_test_acc_mean for x in xs], color="0.5", ls=":",
                    label="no stop (final epoch)")
    ax_fa.axvline(config.false_alarm_prob or np.nan, color="black", ls="--", lw=1,
                  label="target per-run false-alarm probability")
    ax_fa.set_yticks(range(len(names)))
    ax_fa.set_yticklabels([method_label(config, m) for m in names], fontsize=7)
    ax_fa.invert_yaxis()
    ax_fa.set_xlim(0, 1)
    ax_fa.set_xlabel("false-alarm rate on held-out clean runs (95% Wilson)")
    ax_fa.legend(fontsize=7, loc="lower right")
    ax_det.set_xlabel("label noise η")
    ax_det.set_ylabel("mean detection epoch (runs that alerted)")
    ax_acc.set_xlabel("label noise η (0: clean, held out)")
    ax_acc.set_ylabel("clean test accuracy at the stop")
    ax_acc.legend(fontsize=7, loc="lower left")
    for ax in (ax_fa, ax_det, ax_acc):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{config.name}: the curvature rule beside first-order baselines on the same runs",
                 fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
