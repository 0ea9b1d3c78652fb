"""The secondary's transition table: the edges it lists, and no others."""

from __future__ import annotations

import itertools

import pytest

from kemari_suite.errors import StateError
from kemari_suite.replica.secondary import SecondaryState
from kemari_suite.replica.states import SECONDARY_TRANSITIONS
from kemari_suite.service.lifecycle import Lifecycle

S = SecondaryState


def life(initial: SecondaryState = S.WAITING) -> Lifecycle[SecondaryState]:
    return Lifecycle("secondary", initial, SECONDARY_TRANSITIONS)


def test_a_normal_life_up_to_a_failover() -> None:
    lc = life()
    for state in (S.RECEIVING, S.STANDBY, S.FAILING_OVER, S.ACTIVE):
        lc.set(state, f"to {state.value}")
    assert lc.sequence() == ["waiting", "receiving", "standby", "failing-over", "active"]
    assert lc.reason == "to active"


def test_re_receiving_after_a_new_primary_connection() -> None:
    lc = life()
    for state in (S.RECEIVING, S.STANDBY, S.RECEIVING, S.STANDBY):
        lc.set(state)
    assert lc.sequence() == ["waiting", "receiving", "standby", "receiving", "standby"]


def test_lost_during_the_initial_synchronization() -> None:
    lc = life()
    lc.set(S.RECEIVING)
    lc.set(S.WAITING, "primary lost before any commit")
    assert lc.state is S.WAITING


def test_a_guest_shutdown_stops_it_and_a_new_primary_may_start_again() -> None:
    lc = life(S.STANDBY)
    lc.set(S.STOPPED, "the guest reported SHUTDOWN on the primary")
    lc.set(S.RECEIVING)
    lc.set(S.STANDBY)
    assert lc.state is S.STANDBY


def test_a_failed_failover_ends_stopped() -> None:
    lc = life(S.STANDBY)
    lc.set(S.FAILING_OVER)
    lc.set(S.STOPPED, "failover failed")
    with pytest.raises(StateError):
        lc.set(S.FAILING_OVER)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.WAITING, S.STANDBY),  # a commit needs an epoch received first
        (S.WAITING, S.FAILING_OVER),  # nothing committed to resume
        (S.WAITING, S.ACTIVE),
        (S.STANDBY, S.WAITING),
        (S.STANDBY, S.ACTIVE),  # only through FAILING_OVER
        (S.FAILING_OVER, S.STANDBY),
        (S.FAILING_OVER, S.RECEIVING),
        (S.ACTIVE, S.STANDBY),
        (S.STOPPED, S.STANDBY),  # a commit after the guest shut down keeps it stopped
        (S.STOPPED, S.FAILING_OVER),  # never resume a guest that shut down
    ],
)
def test_unlisted_edges_are_refused(old: SecondaryState, new: SecondaryState) -> None:
    lc = life(old)
    with pytest.raises(StateError) as err:
        lc.set(new, "why not")
    assert (err.value.old, err.value.new) == (old.value, new.value)
    assert lc.state is old and lc.history == []


def test_the_table_is_exactly_what_lifecycle_enforces() -> None:
    for old, new in itertools.product(S, S):
        lc = life(old)
        if old is new or new in SECONDARY_TRANSITIONS[old]:
            lc.set(new)
            assert lc.state is new
        else:
            with pytest.raises(StateError):
                lc.set(new)
    # Running the VM alone, it ends only when the guest powers off or panics.
    assert SECONDARY_TRANSITIONS[S.ACTIVE] == frozenset({S.STOPPED})
