"""The study's tables: ``summary.csv`` (a row per variant and checkpoint) and ``stages.csv``
(a row per variant, checkpoint and part), from the checkpoint JSONs
(:mod:`~keras_hesstrace.experiments.study`). No TensorFlow."""

import csv
import io
import os

from keras_hesstrace.experiments.study_config import PARTS, STAGES, describe_variant
from keras_hesstrace.files import atomic_write_text, read_json


def checkpoint_path(out, variant, epoch):
    return os.path.join(out, variant, f"checkpoint-{epoch}.json")


SUMMARY_COLUMNS = (["variant", "depth", "batch_norm", "residual", "epoch", "test_accuracy",
                    "lambda_max", "trace", "trace_stderr"]
                   + [f"{p}_trace" for p in PARTS] + [f"{s}_lambda_max" for s in STAGES])
STAGE_COLUMNS = ["variant", "epoch", "part", "trace", "trace_stderr", "lambda_max", "dimension"]


def _csv_text(columns, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(config, out):
    """``summary.csv`` (a row per variant and checkpoint) and ``stages.csv`` (a row per part)
    from the checkpoint JSONs present; returns the summary rows."""
    rows, stage_rows = [], []
    for variant in config.variants:
        for epoch in config.checkpoints:
            path = checkpoint_path(out, variant, epoch)
            if not os.path.exists(path):
                continue
            r = read_json(path)
            row = {"variant": variant, **describe_variant(variant), "epoch": epoch}
            row.update({k: r[k] for k in ("test_accuracy", "lambda_max", "trace", "trace_stderr")})
            row.update({f"{p}_trace": r["parts"][p]["trace"] for p in PARTS})
            row.update({f"{s}_lambda_max": r["stage_lambda_max"][s] for s in STAGES})
            rows.append(row)
            for p in PARTS:
                stage_rows.append({"variant": variant, "epoch": epoch, "part": p,
                                   "trace": r["parts"][p]["trace"],
                                   "trace_stderr": r["parts"][p]["stderr"],
                                   "lambda_max": r["stage_lambda_max"].get(p, ""),
                                   "dimension": r["stage_dimension"].get(p, "")})
    atomic_write_text(os.path.join(out, "summary.csv"), _csv_text(SUMMARY_COLUMNS, rows))
    atomic_write_text(os.path.join(out, "stages.csv"), _csv_text(STAGE_COLUMNS, stage_rows))
    return rows


