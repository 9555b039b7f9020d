"""What a written file belongs to: the model (its trainable variables) and the settings.

An *identity* is a small JSON-able dict that a file carries (a callback CSV in its
``.identity.json`` sidecar, a calibration, an experiment run's result): the model's
fingerprint (:func:`model_fingerprint`: each trainable variable's path and shape, in
order), the groups recorded and settings such as the probe seed and the snapshot
interval. Resuming or loading compares the saved identity with the current one and
refuses a mismatch with :func:`describe_mismatch`'s message, so another run's or
another model's file is never adopted silently.

>>> saved = {"seed": 0, "every_n_steps": 4, "groups": ["a", "total"]}
>>> describe_mismatch(saved, {"seed": 1, "every_n_steps": 4, "groups": ["a", "total"]})
'seed: 0 there, 1 here'
>>> describe_mismatch(saved, dict(saved)) is None
True
"""

from __future__ import annotations

from typing import Any

_SHOWN = 3  # variables named in a message before "and N more"


def model_fingerprint(model) -> list[list]:
    """``[[path, shape], ...]`` of the model's trainable variables, in the model's order.

    The path is the variable's layer path in the model and its name, as
    ``layer_groups(model, by="variable")`` names it (``"hidden/kernel"``,
    ``"inner_model/dense_1/bias"``). Keras's own ``variable.path`` is not used: it
    depends on the scope the variables were built in (``"sequential/hidden/kernel"``
    for a model built in this process, ``"hidden/kernel"`` for the same model loaded
    from a ``.keras`` file, ``"sequential_1/..."`` for a second model built), so a
    resumed run would look like another model.

    Args:
        model: a built Keras model.

    Returns:
        list of ``[str, list[int]]``: e.g. ``[["dense/kernel", [4, 3]], ["dense/bias", [3]]]``.
    """
    from keras_hesstrace.groups import layer_groups

    return [[path, [int(d) for d in v.shape]]
            for path, (v,) in layer_groups(model, by="variable").items()]


def _describe_models(saved: list, current: list) -> str:
    saved_map = {p: tuple(s) for p, s in saved}
    current_map = {p: tuple(s) for p, s in current}
    parts = []
    missing = [p for p in saved_map if p not in current_map]
    extra = [p for p in current_map if p not in saved_map]
    reshaped = [f"{p} {list(saved_map[p])} there, {list(current_map[p])} here"
                for p in saved_map if p in current_map and saved_map[p] != current_map[p]]
    for label, items in (("variables only there", missing), ("variables only here", extra),
                         ("shapes differ", reshaped)):
        if items:
            more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            parts.append(f"{label}: {', '.join(items[:_SHOWN])}{more}")
    if not parts:
        parts.append("the same variables in another order")
    return f"another model ({len(saved)} trainable variables there, {len(current)} here; "\
           + "; ".join(parts) + ")"


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between a file's identity ``saved`` and the current one; None if nothing.

    Only keys present in both are compared (an older file may lack some). The key
    ``"model"`` holds :func:`model_fingerprint` lists and is described by variable.
    """
    differences = []
    for key in current:
        if key not in saved or saved[key] == current[key]:
            continue
        if key == "model":
            differences.append(_describe_models(saved[key], current[key]))
        else:
            differences.append(f"{key}: {saved[key]!r} there, {current[key]!r} here")
    return "; ".join(differences) or None
