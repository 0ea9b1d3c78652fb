"""Lifecycles checked against a table of allowed transitions.

An agent's state is an enum; every change goes through :class:`Lifecycle`, which
refuses a transition its table does not allow (a bug, raised as
:class:`~kemari_suite.errors.StateError`), records every change in ``history``
(tests assert the exact sequence), and tells observers (artifacts, status files,
alerts). The tables themselves live beside the agents that own the states.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from kemari_suite.errors import StateError

log = logging.getLogger(__name__)

S = TypeVar("S", bound=enum.Enum)


@dataclass(frozen=True)
class Transition(Generic[S]):
    """One recorded change: from, to, why, and when (wall clock)."""

    old: S
    new: S
    reason: str
    at: float


class Lifecycle(Generic[S]):
    """The current state of one agent, changed only along ``allowed`` edges.

    ``allowed`` maps each state to the states it may move to. Setting the current
    state again is a no-op (not recorded), so callers need not check first.
    """

    def __init__(
        self,
        name: str,
        initial: S,
        allowed: Mapping[S, frozenset[S]],
        *,
        on_change: Callable[[Transition[S]], None] | None = None,
    ) -> None:
        missing = [s for s in type(initial) if s not in allowed]
        if missing:
            raise ValueError(f"{name}: no transitions declared for {missing}")
        self.name = name
        self.state = initial
        self.since = time.time()
        self.reason = ""
        self.allowed = allowed
        self.history: list[Transition[S]] = []
        self._observers: list[Callable[[Transition[S]], None]] = []
        if on_change is not None:
            self._observers.append(on_change)

    def observe(self, fn: Callable[[Transition[S]], None]) -> None:
        self._observers.append(fn)

    def can(self, new: S) -> bool:
        return new is self.state or new in self.allowed[self.state]

    def set(self, new: S, reason: str = "") -> None:
        """Move to ``new``.

        Raises:
            StateError: the table does not allow ``state -> new``.
        """
        if new is self.state:
            return
        if new not in self.allowed[self.state]:
            raise StateError(self.name, self.state.value, new.value, reason)
        t = Transition(self.state, new, reason, time.time())
        log.info("%s: %s -> %s %s", self.name, t.old.value, new.value, reason)
        self.state = new
        self.since = t.at
        self.reason = reason
        self.history.append(t)
        for fn in self._observers:
            fn(t)

    def sequence(self) -> list[str]:
        """Every state this lifecycle has been in, in order (the initial one first)."""
        if not self.history:
            return [self.state.value]
        return [self.history[0].old.value, *(t.new.value for t in self.history)]


def table(edges: Mapping[S, tuple[S, ...]]) -> dict[S, frozenset[S]]:
    """A transition table from ``{state: (next, ...)}`` (readable in the source)."""
    return {s: frozenset(n) for s, n in edges.items()}


__all__ = ["Lifecycle", "Transition", "table"]
