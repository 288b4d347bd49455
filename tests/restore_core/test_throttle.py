"""The throttle knob table: each knob's range is stated once
(restore_core.throttle.KNOBS) and the engine holds a pair's throttle to it
(the config schema and the Ansible documentation are held to it in
tests/target/test_restoreconfig.py and tests/ansible)."""
from __future__ import annotations

from dataclasses import fields

import pytest

from restore_core.throttle import KNOBS, Throttle


def test_the_table_names_every_knob_and_every_default_is_in_range():
    assert [k.name for k in KNOBS] == [f.name for f in fields(Throttle)]
    Throttle().validate()


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_each_knob_accepts_its_bounds_and_refuses_one_past(knob):
    Throttle(**{knob.name: knob.lo}).validate()
    if knob.hi is not None:
        Throttle(**{knob.name: knob.hi}).validate()
        with pytest.raises(ValueError, match=f"{knob.name} must be {knob.lo}..{knob.hi}"):
            Throttle(**{knob.name: knob.hi + 1}).validate()
    with pytest.raises(ValueError, match=f"{knob.name} must be .*not {knob.lo - 1}"):
        Throttle(**{knob.name: knob.lo - 1}).validate()
