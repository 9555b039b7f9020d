"""Argument checks shared across the package, so every message reads the same."""

import numbers


def check_integer(name, value, minimum=1, maximum=None, none=None):
    """Return ``value`` as an ``int`` if it is a whole number in [minimum, maximum].

    Args:
        name: the argument's name, used in the message.
        value: the value to check. ``bool`` is refused; a whole float (``2.0``) and numpy
            integers are accepted.
        minimum: smallest allowed value (inclusive).
        maximum: largest allowed value (inclusive), or None for no bound.
        none: None to refuse ``None``; a short text to accept ``None`` (returned as
            None), saying in the message what None means (e.g. ``"whole runs"``).

    Returns:
        ``int(value)``, or None when ``value`` is None and ``none`` is given.

    Raises:
        ValueError: naming the argument, what it accepts, and the value given.
    """
    if value is None and none is not None:
        return None
    if (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and float(value).is_integer() and value >= minimum
            and (maximum is None or value <= maximum)):
        return int(value)
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    allowed = f"None ({none}) or an integer {bound}" if none is not None else f"an integer {bound}"
    raise ValueError(f"{name} must be {allowed}, got {value!r}.")


SEED_MAX = 2**63 - 1  # seeds are int64 (TensorFlow's stateless seeds; numpy accepts them)


def check_seed(value, name="seed"):
    """``value`` as an int seed in [0, 2**63 - 1], or None (a fresh seed is then drawn).

    >>> check_seed(3.0), check_seed(None)
    (3, None)
    """
    return check_integer(name, value, minimum=0, maximum=SEED_MAX, none="a fresh seed is drawn")
