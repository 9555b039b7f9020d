"""layer_groups: names by path, sharing, nesting, patterns, callables, errors."""

from collections import OrderedDict

import pytest
import keras

import keras_hesstrace as kh
import models_for_tests as mt


def test_nested_model_groups_are_named_by_path_and_cover_every_variable():
    model = mt.nested()
    groups = kh.layer_groups(model)
    assert list(groups) == ["stem", "inner/d1", "inner/d2", "head"]
    flat = [id(v) for vs in groups.values() for v in vs]
    assert sorted(flat) == sorted(id(v) for v in model.trainable_variables)
    assert len(flat) == len(set(flat))


def test_subclassed_model_own_variables_form_a_group():
    model = mt.subclassed()
    groups = kh.layer_groups(model)
    assert list(groups) == ["subclassed", "a", "b"]
    assert [v.name for v in groups["subclassed"]] == ["scale"]


def test_shared_layer_is_one_group():
    groups = kh.layer_groups(mt.shared())
    assert list(groups) == ["shared", "head"]
    assert [v.name for v in groups["shared"]] == ["kernel", "bias"]


def test_frozen_layers_are_left_out():
    model = mt.mlp()
    model.get_layer("hidden2").trainable = False
    assert list(kh.layer_groups(model)) == ["hidden", "head"]


def test_by_variable_callable_patterns_and_explicit_mapping():
    model = mt.nested()
    by_var = kh.layer_groups(model, "variable")
    assert list(by_var)[:2] == ["stem/kernel", "stem/bias"]
    assert all(len(vs) == 1 for vs in by_var.values())
    kernels = kh.layer_groups(model, lambda path, v: "kernels" if v.name == "kernel" else None)
    assert list(kernels) == ["kernels"] and len(kernels["kernels"]) == 4
    stages = kh.layer_groups(model, {"inner/*": "inner", "*": "outer"})
    assert list(stages) == ["outer", "inner"]
    assert len(stages["inner"]) == 4 and len(stages["outer"]) == 4
    head = model.get_layer("head").trainable_variables
    explicit = kh.layer_groups(model, OrderedDict(head=list(head)))
    assert list(explicit) == ["head"] and explicit["head"] == list(head)


def test_grouping_errors_name_the_problem():
    model = mt.nested()
    with pytest.raises(ValueError, match="No layer path matches the patterns.*stem, inner/d1"):
        kh.layer_groups(model, {"stage9/*": "x"})
    # one group of several left empty is named, not dropped (issue 18 case 8)
    with pytest.raises(ValueError, match=r"group 'late' is empty: its pattern\(s\) \['stage9/\*'\] match no"):
        kh.layer_groups(model, {"inner/*": "inner", "stage9/*": "late"})
    with pytest.raises(ValueError, match="group 'shadowed' is empty.*an earlier pattern took"):
        kh.layer_groups(model, {"*": "all", "inner/*": "shadowed"})
    with pytest.raises(ValueError, match="Unknown grouping"):
        kh.layer_groups(model, "block")
    other = mt.mlp()
    with pytest.raises(ValueError, match="not a trainable variable of the model"):
        kh.layer_groups(model, {"g": list(other.trainable_variables)})
    v = model.trainable_variables[0]
    with pytest.raises(ValueError, match="already in another group"):
        kh.layer_groups(model, {"a": [v], "b": [v]})
    with pytest.raises(TypeError, match="not int"):
        kh.layer_groups(model, 3)
    with pytest.raises(ValueError, match="not built"):
        kh.layer_groups(keras.Sequential([keras.layers.Dense(2)]))
