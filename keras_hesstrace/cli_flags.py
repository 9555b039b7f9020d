"""The command line's flags: range-checked argparse types, one-line usage errors, and the
experiment settings as flags (their types, metavars and help from the config's docstring).

Nothing here imports TensorFlow (`keras-hesstrace --help` must answer in a fraction of a second).
"""

import argparse
import math


def number_type(kind, minimum=None, maximum=None, low_open=False, high_open=False):
    """An argparse type: a ``kind`` (int or float) in a range; its message names the range.

    Refused at parse time, so a bad flag is one line and exit 2 before anything is loaded.
    """
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = minimum is not None and (value <= minimum if low_open else value < minimum)
        too_high = maximum is not None and (value >= maximum if high_open else value > maximum)
        if too_low or too_high:
            if minimum is not None and maximum is not None:
                span = f"in {'(' if low_open else '['}{minimum}, {maximum}{')' if high_open else ']'}"
            elif minimum is not None:
                span = f"{'>' if low_open else '>='} {minimum}"
            else:
                span = f"{'<' if high_open else '<='} {maximum}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT = number_type(int, 1)  # a whole number >= 1
POSITIVE = number_type(float, 0, low_open=True)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: what is wrong and where to look."""

    def error(self, message):
        import re

        message = re.sub(r"^argument (\S+): must be ", r"\1 must be ", message)  # --num-probes must be >= 1, ...
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def parse_field(kind):
    """An argparse type for an ExperimentConfig field annotation (lists: comma-separated)."""
    import typing

    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        inner = parse_field(next(a for a in args if a is not type(None)))
        return lambda text: None if text.lower() in ("none", "null", "") else inner(text)
    if origin in (list, typing.List):
        item = parse_field(args[0])
        return lambda text: [item(t) for t in text.split(",") if t.strip()]
    if kind is bool:
        def parse_bool(text):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return parse_bool
    return kind


def metavar_of(kind):
    """A metavar for an ExperimentConfig field annotation."""
    import typing

    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:
        return metavar_of(next(a for a in args if a is not type(None)))
    if typing.get_origin(kind) in (list, typing.List):
        return f"{metavar_of(args[0])},..."
    return {int: "N", float: "X", str: "TEXT"}.get(kind, "VALUE")


def show_value(value):
    """A setting's value as the flag takes it (lists comma-separated)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


# Fields documented together in ExperimentConfig's docstring, each said on its own.
OWN_HELP = {
    "epochs": "training epochs per run",
    "batch_size": "SGD mini-batch size",
    "learning_rate": "SGD learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "the L2 coefficient lambda (gradient lambda * W)",
}


def field_help(cls):
    """One line of help per field, from the ``Attributes:`` section of ``cls``'s docstring.

    The first sentence of each entry, without reST markup; fields documented together
    (``a, b: ...``) share it unless ``OWN_HELP`` says each on its own.
    """
    import inspect
    import re

    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    entries, names = {}, None
    if "Attributes:" in lines:
        for line in lines[lines.index("Attributes:") + 1:]:
            match = re.match(r"^    ([a-z_0-9]+(?:, [a-z_0-9]+)*): ?(.*)$", line)
            if match:
                names = match.group(1).split(", ")
                for name in names:
                    entries[name] = match.group(2)
            elif line.startswith("        ") and names:
                for name in names:
                    entries[name] += " " + line.strip()
            elif line.strip():
                names = None
    helps = {}
    for name, text in entries.items():
        text = re.sub(r"``|:[a-z]+:`([^`]*)`", lambda m: m.group(1) or "", text).strip()
        first = re.split(r"(?<=[.;])\s+(?=[A-Z(])", text)[0].rstrip(".;")
        helps[name] = first
    helps.update(OWN_HELP)
    return helps


def flag_of_setting(message, names, given=()):
    """The flag of the setting that ``message`` (a config's ValueError) names, or None.

    Of several, the first the user gave as a flag (``given``), else the first named.
    """
    import re

    named = [n for n in re.findall(r"[a-z][a-z0-9_]*", message) if n in names]
    for name in [n for n in named if n in given] + named:
        return "--" + name.replace("_", "-")
    return None
