"""Partition a model's trainable variables into groups (layers, variables, stages).

A group is a set of trainable variables whose diagonal Hessian block is estimated
together. The default, ``by="layer"``, makes every leaf layer that owns trainable
variables one group, named by its path in the model; a layer called several times
(weight sharing) is one group, because its variables are the same objects.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import OrderedDict

import keras

import numpy as np


def _sublayers(layer):
    """Direct sublayers of ``layer`` (Keras tracks them; Functional includes InputLayers)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _walk(layer, prefix, seen_layers, out):
    """Depth-first walk: append (layer_path, variables owned by this layer itself)."""
    children = []
    for child in _sublayers(layer):
        if id(child) in seen_layers:
            continue  # a layer reached twice (shared between nested models): first path wins
        seen_layers.add(id(child))
        children.append(child)
    child_vars = set()
    for child in children:
        for v in child.trainable_variables:
            child_vars.add(id(v))
    own = [v for v in layer.trainable_variables if id(v) not in child_vars]
    if own:
        out.append((prefix, own))
    for child in children:
        path = f"{prefix}/{child.name}" if prefix else child.name
        _walk(child, path, seen_layers, out)


def _layer_variables(model):
    """[(layer_path, [variables])] in model order; every trainable variable once."""
    out = []
    _walk(model, "", {id(model)}, out)
    # Variables tracked by the model object itself get the model's name.
    out = [(path or model.name, vs) for path, vs in out]
    seen = set()
    dedup = []
    for path, vs in out:
        vs = [v for v in vs if id(v) not in seen]
        seen.update(id(v) for v in vs)
        if vs:
            dedup.append((path, vs))
    return dedup


def layer_groups(model: keras.Model, by="layer") -> OrderedDict:
    """Group a model's trainable variables.

    Args:
        model: a built ``keras.Model`` (Sequential, Functional or subclassed).
        by: how to group.
            - ``"layer"``: one group per leaf layer that owns trainable variables,
              named by its path (``"inner_model/dense_1"``). Nested models and
              layers are walked; a layer called several times is one group.
            - ``"variable"``: one group per trainable variable (``"dense/kernel"``).
            - a callable ``f(layer_path, variable) -> str | None``: the group name
              for each variable; ``None`` leaves it out of every group.
            - a dict ``{pattern: group_name}`` of shell-style patterns matched
              against layer paths (``{"stage2/*": "stage2"}``); the first matching
              pattern wins and unmatched layers are left out.
            - a mapping ``{group_name: [variables]}`` is returned as given after
              checking every entry is a trainable variable of the model.

    Returns:
        ``OrderedDict`` group name -> list of variables, in model order. Groups are
        disjoint; with ``"layer"`` and ``"variable"`` they cover every trainable
        variable.

    Raises:
        ValueError: unbuilt model, no trainable variables, an unknown ``by``, a
            pattern dict that matches nothing, a pattern group left empty, or
            variables not in the model.

    Example (a model with layers "hidden" and "head"):
        >>> list(layer_groups(model))
        ['hidden', 'head']
        >>> [v.name for v in layer_groups(model)["head"]]
        ['kernel', 'bias']
        >>> list(layer_groups(model, {"hid*": "body", "head": "head"}))   # stages by path pattern
        ['body', 'head']
    """
    check_model(model)
    pairs = _layer_variables(model)
    groups = OrderedDict()
    if isinstance(by, str):
        if by == "layer":
            for path, vs in pairs:
                groups.setdefault(path, []).extend(vs)
        elif by == "variable":
            for path, vs in pairs:
                for v in vs:
                    name = f"{path}/{v.name}"
                    if name in groups:
                        name = f"{name}:{len(groups)}"
                    groups[name] = [v]
        else:
            raise ValueError(
                f"Unknown grouping by={by!r}: use 'layer', 'variable', a callable, "
                "a dict of layer-path patterns -> group name, or {name: [variables]}."
            )
        return groups
    if callable(by):
        for path, vs in pairs:
            for v in vs:
                name = by(path, v)
                if name is not None:
                    groups.setdefault(str(name), []).append(v)
        if not groups:
            raise ValueError("The grouping callable assigned no variable to any group.")
        return groups
    if isinstance(by, dict):
        values = list(by.values())
        if values and all(isinstance(x, (list, tuple)) for x in values):
            return _check_explicit(model, by)
        for path, vs in pairs:
            for pattern, name in by.items():
                if fnmatch.fnmatchcase(path, pattern):
                    groups.setdefault(str(name), []).extend(vs)
                    break
        paths = ", ".join(p for p, _ in pairs[:8]) + (", ..." if len(pairs) > 8 else "")
        if not groups:
            raise ValueError(f"No layer path matches the patterns {list(by)}; layer paths are: {paths}")
        empty = {str(n): [p for p, m in by.items() if str(m) == str(n)] for n in by.values()
                 if str(n) not in groups}
        if empty:
            raise ValueError(
                "; ".join(f"group {n!r} is empty: its pattern(s) {ps} match no layer path (or only "
                          "paths an earlier pattern took)" for n, ps in empty.items())
                + f". Layer paths are: {paths}"
            )
        return groups
    raise TypeError(f"by must be a string, a callable or a dict, not {type(by).__name__}.")


def _check_explicit(model, mapping):
    ids = {id(v) for v in model.trainable_variables}
    seen = set()
    out = OrderedDict()
    for name, vs in mapping.items():
        for v in vs:
            if id(v) not in ids:
                raise ValueError(f"Group {name!r}: {getattr(v, 'path', v)} is not a trainable variable of the model.")
            if id(v) in seen:
                raise ValueError(f"Group {name!r}: {v.path} is already in another group; groups must be disjoint.")
            seen.add(id(v))
        out[str(name)] = list(vs)
    return out


def check_model(model):
    """Raise a clear ValueError unless ``model`` is a built Keras model with trainable variables."""
    import keras

    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: call it on a batch (model(x)) or "
            "model.build(input_shape) before estimating its Hessian."
        )
    if not model.trainable_variables:
        raise ValueError(
            f"Model {model.name!r} has no trainable variables (is it frozen with "
            "trainable=False?): there is no Hessian to estimate."
        )


def group_indices(model, groups):
    """Map groups to indices into ``model.trainable_variables``.

    Args:
        model: the model the groups were made from.
        groups: ``OrderedDict`` name -> variables (from :func:`layer_groups`).

    Returns:
        (names, indices): a tuple of group names and a tuple of int tuples.
    """
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    names, indices = [], []
    for name, vs in groups.items():
        try:
            idx = tuple(position[id(v)] for v in vs)
        except KeyError:
            raise ValueError(f"Group {name!r} holds a variable that is not trainable in the model.") from None
        names.append(name)
        indices.append(idx)
    return tuple(names), tuple(indices)


def group_sizes(groups):
    """Number of scalar parameters in each group, as an int array of shape [G]."""
    return np.array([sum(int(np.prod(v.shape)) for v in vs) for vs in groups.values()], dtype=np.int64)


_SPEC_NAMES = ("layer", "variable")


def is_grouping_spec(value) -> bool:
    """True when ``value`` says HOW to group (a ``by=``), not WHICH groups (a ``groups=``).

    The specs are ``"layer"``, ``"variable"``, a callable and a dict (of path patterns, or
    an explicit ``{name: [variables]}``); a selection is a group name or a list of names.
    """
    return (isinstance(value, str) and value in _SPEC_NAMES) or callable(value) or isinstance(value, dict)


def select_groups(mapping, groups=None, by="layer"):
    """The groups of ``mapping`` named in ``groups``, in the order given.

    Args:
        mapping: ``{name: [variables]}`` from :func:`layer_groups`.
        groups: ``None`` (all of them), a group name, or a list of group names.
        by: the grouping that made ``mapping``, named in the error message.

    Returns:
        ``OrderedDict`` name -> variables.

    Raises:
        ValueError: an empty selection or a name not in ``mapping`` (the message lists them).
    """
    if groups is None:
        return OrderedDict(mapping)
    wanted = [groups] if isinstance(groups, str) else list(groups)
    if not wanted:
        raise ValueError("groups is empty: pass a group name, a list of names, or None for every group.")
    missing = [g for g in wanted if g not in mapping]
    if missing:
        by_text = by if isinstance(by, str) else type(by).__name__
        raise ValueError(f"Unknown group(s) {missing}; the groups (by={by_text!r}) are: {list(mapping)}")
    return OrderedDict((g, mapping[g]) for g in wanted)


def split_grouping(by, groups, stacklevel=2):
    """``(by, groups)`` with a grouping passed as ``groups=`` (the old spelling) moved to ``by=``.

    ``by`` says how to group and ``groups`` which groups to use, everywhere in the
    package. A grouping spec given as ``groups=`` while ``by`` is left at ``"layer"``
    is taken as ``by=`` with a DeprecationWarning.
    """
    if groups is not None and is_grouping_spec(groups):
        if by != "layer":
            raise ValueError(f"groups={groups!r} is a grouping, and by={by!r} is one too: pass the grouping as by= "
                             "and the group names to use as groups=.")
        warnings.warn("groups= now selects group names; pass the grouping as by= (e.g. by='variable').",
                      DeprecationWarning, stacklevel=stacklevel + 1)
        return groups, None
    return by, groups
