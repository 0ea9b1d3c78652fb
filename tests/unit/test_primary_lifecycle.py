"""The primary's lifecycle table: the edges the engine takes are allowed, others refused."""

from __future__ import annotations

import pytest

from kemari_suite.checkpoint.states import PRIMARY_TRANSITIONS, PrimaryState
from kemari_suite.errors import StateError
from kemari_suite.service.lifecycle import Lifecycle, Transition

P = PrimaryState


def life() -> Lifecycle[PrimaryState]:
    return Lifecycle("primary", P.STARTING, PRIMARY_TRANSITIONS)


@pytest.mark.parametrize(
    "path",
    [
        # protect, lose the secondary (witness agrees), re-protect, stop
        [P.SYNCING, P.PROTECTED, P.UNPROTECTED, P.SYNCING, P.PROTECTED, P.STOPPED],
        # no tiebreaker: output held until the secondary returns
        [P.SYNCING, P.PROTECTED, P.HELD, P.SYNCING, P.PROTECTED],
        # planned switchover
        [P.SYNCING, P.PROTECTED, P.SWITCHED],
        # the tiebreaker lost
        [P.SYNCING, P.PROTECTED, P.FENCED],
        # no secondary at start, the witness agrees
        [P.UNPROTECTED, P.SYNCING],
    ],
)
def test_the_engines_paths_are_allowed(path: list[PrimaryState]) -> None:
    lc = life()
    seen: list[Transition[PrimaryState]] = []
    lc.observe(seen.append)
    for state in path:
        lc.set(state, "test")
    assert lc.sequence() == ["starting", *(s.value for s in path)]
    assert [t.new for t in seen] == path


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], P.PROTECTED),  # never protected without a synchronization
        ([P.SYNCING, P.PROTECTED, P.UNPROTECTED], P.PROTECTED),  # only through SYNCING
        ([P.SYNCING, P.PROTECTED, P.FENCED], P.SYNCING),  # fenced is final
        ([P.SYNCING, P.PROTECTED, P.SWITCHED], P.PROTECTED),  # switched over is final
        ([P.STOPPED], P.SYNCING),  # stopped is final
        ([P.SYNCING], P.SWITCHED),  # a switchover needs protection
    ],
)
def test_other_edges_are_refused(path: list[PrimaryState], bad: PrimaryState) -> None:
    lc = life()
    for state in path:
        lc.set(state)
    before = lc.sequence()
    with pytest.raises(StateError) as err:
        lc.set(bad, "why")
    assert err.value.old == lc.state.value and err.value.new == bad.value
    assert lc.sequence() == before  # nothing recorded


def test_every_state_has_a_row() -> None:
    assert set(PRIMARY_TRANSITIONS) == set(PrimaryState)
    with pytest.raises(ValueError, match="no transitions declared"):
        Lifecycle("x", P.STARTING, {P.STARTING: frozenset()})


def test_setting_the_same_state_is_not_a_transition() -> None:
    lc = life()
    lc.set(P.SYNCING)
    lc.set(P.SYNCING)
    assert lc.sequence() == ["starting", "syncing"]
