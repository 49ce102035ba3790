"""Plan: parsing from mappings and JSON text is strict; nothing is silently reinterpreted."""

from __future__ import annotations

import json

import numpy as np
import pytest

import graphprune as gp


@pytest.mark.parametrize("text", [
    '{"0": [1], "00": [2]}',  # two spellings of group 0
    '{"0": [1], "0": [2]}',  # a repeated key (json keeps the last one)
    '{"1": [1], "01": [2]}',
], ids=["zero-padded", "repeated", "one-padded"])
def test_json_keys_naming_one_group_twice_are_rejected(text):
    with pytest.raises(gp.PlanError, match="more than once|not a group id"):
        gp.Plan.from_json(text)


@pytest.mark.parametrize("key", ["00", "+1", " 1", "1 ", "01", "-0", "1_0", "\u0661"])
def test_non_canonical_group_id_strings_are_rejected(key):
    with pytest.raises(gp.PlanError, match="group id"):
        gp.Plan({key: [0]})
    with pytest.raises(gp.PlanError):
        gp.Plan.from_json(json.dumps({key: [0]}))


@pytest.mark.parametrize("text", ['{"0": "12"}', '{"0": "1"}', '{"0": {"1": 2}}', '{"0": [[1]]}',
                                  '{"0": ["1"]}', '{"0": null}'])
def test_channels_must_be_a_list_of_ints(text):
    with pytest.raises(gp.PlanError, match="group 0"):
        gp.Plan.from_json(text)


def test_mapping_with_int_and_string_spelling_of_one_group_is_rejected():
    with pytest.raises(gp.PlanError, match="more than once"):
        gp.Plan({0: [1], "0": [2]})
    with pytest.raises(gp.PlanError, match="more than once"):
        gp.Plan({"3": [1], 3: [2]})


@pytest.mark.parametrize("channels", ["12", b"12", {1: 2}, 1.0, [1.0], [True], [[1]], ["1"]])
def test_mapping_channels_must_be_ints(channels):
    with pytest.raises(gp.PlanError, match="group 0"):
        gp.Plan({0: channels})


def test_accepted_forms_still_parse():
    assert gp.Plan({0: [3, 1, 3]}) == {0: (1, 3)}
    assert gp.Plan({"12": [0]}) == {12: (0,)}
    assert gp.Plan({np.int64(2): np.array([4, 1])}) == {2: (1, 4)}
    assert gp.Plan({0: range(2), 1: (5,), 2: {7}}) == {0: (0, 1), 1: (5,), 2: (7,)}
    assert gp.Plan.from_json('{"-1": [0]}') == {-1: (0,)}  # canonical; validate() rejects it
    assert gp.Plan.from_json('{"0": [], "3": [2]}') == {3: (2,)}
    plan = gp.Plan({5: [9, 0], 10: [1]})
    assert gp.Plan.from_json(plan.to_json()) == plan
