"""The model × consumer table of docs/models.md: measured errors of every Hessian consumer on the zoo.

Runs ``tests/test_zoo.py`` (each test records its measured relative error against the
independent reference) and prints one markdown table: per zoo model, the mode that
``mode="auto"`` chose and the largest relative error of each consumer.

    python benchmarks/zoo_table.py              # ~3-5 min on 2 CPU cores
    python benchmarks/zoo_table.py --xml FILE   # re-print from an earlier run's junit XML
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

COLUMNS = [
    ("mode", "test_hvp", "mode_used", "auto"),
    ("H·v vs FD", "test_hvp", "rel_err_fd", None),
    ("H·v vs H", "test_hvp", "rel_err_ref", None),
    ("loss vs hand", "test_operator_loss_equals_keras_compute_loss", "rel_err_hand", None),
    ("layer_traces", "test_layer_traces_per_probe_samples", "rel_err", None),
    ("top_eigenvalues", "test_top_eigenvalues", "rel_err", None),
    ("hessian_trace", "test_hessian_trace_samples", "rel_err", None),
    ("diagonal", "test_diagonal", "rel_err", None),
    ("spectral_density", "test_spectral_density_moments", "rel_err", None),
    ("loss_landscape", "test_loss_landscape_values", "rel_err", None),
    ("callback", "test_callback_first_snapshot", "rel_err", None),
    ("CLI estimate", "test_cli_estimate", "rel_err", None),
]


def read(xml_path):
    """{case: {(test, property): [values]}} and {case: set of failed tests}."""
    values = collections.defaultdict(lambda: collections.defaultdict(list))
    failed = collections.defaultdict(set)
    order = []
    for tc in ET.parse(xml_path).iter("testcase"):
        match = re.match(r"(test_\w+)\[([^\]-]+)(?:-(\w+))?\]", tc.get("name", ""))
        if not match or "test_zoo" not in tc.get("classname", ""):
            continue
        test, case, variant = match.groups()
        if case not in order:
            order.append(case)
        if tc.find("failure") is not None or tc.find("error") is not None:
            failed[case].add(test)
        for prop in tc.iter("property"):
            values[case][(test, prop.get("name"), variant)].append(prop.get("value"))
    return order, values, failed


def table(xml_path):
    order, values, failed = read(xml_path)
    lines = ["| model | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for case in order:
        cells = []
        for _, test, prop, variant in COLUMNS:
            found = [v for (t, p, var), vs in values[case].items() for v in vs
                     if t == test and p == prop and (variant is None or var in (variant, "default"))]
            if test in failed[case]:
                cells.append("**FAIL**")
            elif not found:
                cells.append("–")
            elif prop == "mode_used":
                cells.append(found[0])
            else:
                cells.append(f"{max(float(v) for v in found):.0e}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xml", default=None, help="junit XML of an earlier run of tests/test_zoo.py")
    args = parser.parse_args()
    xml_path = args.xml
    if xml_path is None:
        xml_path = os.path.join(tempfile.mkdtemp(), "zoo.xml")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_zoo.py", "-p", "no:cacheprovider",
                        f"--junitxml={xml_path}"], cwd=root, check=False)
    print(table(xml_path))


if __name__ == "__main__":
    main()
