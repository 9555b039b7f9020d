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
        for method in methods(config):
            m = sub[sub["method"] == method]
            if m.empty:
                continue
            cells = []
            for rate in [0.0] + rates:
                row = m[m["noise_rate"] == rate]
                if row.empty:
                    cells.append("–")
                    continue
                r = row.iloc[0]
                frac = f"{int(r.n_alerts)}/{int(r.n_runs)}"
                if rate == 0.0:
                    cells.append(f"{frac} = {r.alert_rate:.2f} [{r.alert_rate_low:.2f}, "
                                 f"{r.alert_rate_high:.2f}]")
                else:
                    cells.append(f"{frac}, {_num(r.det_epoch_mean, '.1f')} ± "
                                 f"{_num(r.det_epoch_sd, '.1f')}")
            lines.append(f"| {method_label(config, method)} | " + " | ".join(cells) + " |")
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
        for method in methods(config):
            m = sub[sub["method"] == method]
            if m.empty:
                continue
            cells = []
            for rate in [0.0] + rates:
                row = m[m["noise_rate"] == rate]
                cells.append("–" if row.empty else
                             f"{row.iloc[0].test_acc_at_stop_mean:.3f}, "
                             f"{_num(row.iloc[0].memorised_at_stop_mean, '.2f')}")
            lines.append(f"| {method_label(config, method)} | " + " | ".join(cells) + " |")
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
