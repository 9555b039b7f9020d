"""Re-score a finished memorisation experiment with other rule settings, no retraining.

The runner (``keras-hesstrace experiment``) keeps every run's trace CSV. This script reads
them back and applies the alert rule with another monitored group, reference snapshot or
resampling, and with the two groups of clean runs used either way round:

- ``as run``: the calibration runs calibrate; the held-out clean runs give the false alarms;
- ``swapped``: the held-out clean runs calibrate; the calibration runs give the false alarms;
- ``all clean``: every clean run calibrates (leave-one-out false alarms only).

Usage::

    python examples/rescore_experiment.py runs/cpu-small                       # its own settings
    python examples/rescore_experiment.py runs/cpu-small --group head --reference none
    python examples/rescore_experiment.py runs/cpu-small --group dense --reference 1

Prints one line per split: h, leave-one-out and held-out false alarms, and per noise rate
the alerts and the mean detection epoch (epochs completed at the first alert).
"""

import argparse
import json
import os

import numpy as np


def _trajectories(config, out, cell, specs, group):
    from keras_hesstrace.experiments.scoring import rule_values
    from keras_hesstrace.experiments.storage import read_trajectory

    runs = []
    for spec in specs:
        run_dir = os.path.join(out, cell, "runs", spec.run_id)
        with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
            spe = json.load(f)["steps_per_epoch"]
        steps, raw = read_trajectory(os.path.join(run_dir, "traces.csv"), group)
        runs.append((steps / spe, rule_values(config, raw)))
    return runs


def _first_alert_epoch(cal, group, epochs, values):
    from keras_hesstrace.experiments.scoring import score_trajectory

    _, alert = score_trajectory(cal, group, range(len(values)), values)
    return None if alert is None else float(epochs[alert])


def rescore(out, group=None, reference="config", block_length=None, target_arl0=None):
    """Lines of text: the rule re-applied to a finished experiment's CSVs (see the module)."""
    from keras_hesstrace.experiments.config import ExperimentConfig, cells, run_specs
    from keras_hesstrace.monitor import calibrate_threshold

    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = ExperimentConfig.from_dict(json.load(f))
    group = config.monitor[0] if group is None else group
    ref = config.reference_snapshot if reference == "config" else reference
    from keras_hesstrace.experiments.scoring import target_of

    if target_arl0 is not None:
        target = {"target_arl0": target_arl0, "n_resamples": config.n_resamples}
    else:
        target = target_of(config)
    if "target_arl0" in target:
        target["block_length"] = block_length
    what = (f"per-run false alarm {target['false_alarm_prob']:g}" if "false_alarm_prob" in target
            else f"target ARL0 {target['target_arl0']:g}, "
                 f"{'whole runs' if block_length is None else f'blocks of {block_length}'}")
    lines = [f"{out}: group {group!r}, reference snapshot {ref}, {what}"]
    for arch, dataset in cells(config):
        cell = f"{arch}-{dataset}"
        phase1, phase2 = run_specs(config, arch, dataset)
        calib = _trajectories(config, out, cell, phase1, group)
        heldout = _trajectories(config, out, cell, [s for s in phase2 if s.role == "clean"], group)
        noisy = {}
        for s in phase2:
            if s.role == "noisy":
                noisy.setdefault(s.noise_rate, []).append(
                    _trajectories(config, out, cell, [s], group)[0])
        splits = [("as run", calib, heldout), ("swapped", heldout, calib),
                  ("all clean", calib + heldout, [])]
        for name, cal_runs, test_runs in splits:
            if len(cal_runs) < 3:
                continue
            cal = calibrate_threshold({group: [v for _, v in cal_runs]}, **target,
                                      delta=config.delta, transform=config.transform,
                                      seed=0, reference_snapshot=ref)
            r = cal[group]
            text = (f"  {cell} {name:9s}: h = {r.threshold:6.2f}; LOO false alarms "
                    f"{r.loo_false_alarms}/{r.n_runs}")
            if test_runs:
                fa = [_first_alert_epoch(cal, group, e, v) for e, v in test_runs]
                text += f"; held-out false alarms {sum(a is not None for a in fa)}/{len(fa)}"
            for eta in sorted(noisy):
                al = [_first_alert_epoch(cal, group, e, v) for e, v in noisy[eta]]
                hit = [a for a in al if a is not None]
                mean = f"{np.mean(hit):.1f}" if hit else "–"
                text += f"; η {eta:g}: {len(hit)}/{len(al)} at {mean}"
            lines.append(text)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a finished experiment's --out folder")
    p.add_argument("--group", default=None, help="monitored group (default: the config's first)")
    p.add_argument("--reference", default="config",
                   help="reference snapshot: an index, 'none', or 'config' (default)")
    p.add_argument("--block-length", type=int, default=None,
                   help="resampling blocks (default: whole runs; 1: i.i.d.)")
    p.add_argument("--target-arl0", type=float, default=None)
    a = p.parse_args(argv)
    ref = a.reference if a.reference == "config" else (
        None if a.reference.lower() == "none" else int(a.reference))
    print("\n".join(rescore(a.out, a.group, ref, a.block_length, a.target_arl0)))


if __name__ == "__main__":
    main()
