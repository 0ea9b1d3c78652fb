"""HELD has a way out (issue 13, item 5): the lifecycle allows the operator's
``release --solo`` edge and nothing new besides. The bound itself, on a real QEMU:
tests/integration/test_held_bound_qemu.py."""

from __future__ import annotations

import pytest

from kemari_suite.checkpoint.states import PRIMARY_TRANSITIONS, PrimaryState
from kemari_suite.errors import StateError
from kemari_suite.service.lifecycle import Lifecycle

P = PrimaryState


def test_release_solo_takes_held_to_unprotected_then_back_to_syncing() -> None:
    lc = Lifecycle("primary", P.STARTING, PRIMARY_TRANSITIONS)
    for s in (P.SYNCING, P.PROTECTED, P.HELD, P.UNPROTECTED, P.SYNCING, P.PROTECTED):
        lc.set(s, "test")
    assert lc.sequence()[3:5] == ["held", "unprotected"]


def test_held_still_never_goes_straight_back_to_protected() -> None:
    lc = Lifecycle("primary", P.STARTING, PRIMARY_TRANSITIONS)
    for s in (P.SYNCING, P.PROTECTED, P.HELD):
        lc.set(s)
    with pytest.raises(StateError):
        lc.set(P.PROTECTED)
    assert PRIMARY_TRANSITIONS[P.HELD] == frozenset({P.SYNCING, P.UNPROTECTED, P.FENCED, P.STOPPED})
