"""Under ``tiebreaker = "pacemaker"`` a failover asked on the standby's control socket
(``kemari failover --yes``) goes ahead only while the cluster's promotion of this node
is in force: the real tiebreaker and grant file, the standby's own check."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kemari_suite.config import load
from kemari_suite.errors import FailoverError
from kemari_suite.ha.pacemaker import PacemakerTiebreaker, PromotionGrant
from kemari_suite.replica.commands import cluster_promoted


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def event(self, name: str, **kw: Any) -> None:
        self.seen.append((name, kw))


def agent(tmp_path: Path, tiebreaker: str) -> Any:
    async def quorate() -> bool:
        return True

    cfg = load(None)
    cfg = dataclasses.replace(
        cfg, replication=dataclasses.replace(cfg.replication, tiebreaker=tiebreaker)
    )
    tb = PacemakerTiebreaker(tmp_path / "grant", "b", quorate=quorate, wall=lambda: 1000.0)
    return SimpleNamespace(cfg=cfg, watch=SimpleNamespace(witness=tb), artifacts=Events())


def test_refused_without_the_clusters_promotion(tmp_path: Path) -> None:
    a = agent(tmp_path, "pacemaker")
    with pytest.raises(FailoverError, match=r"not promoted.*the cluster decides"):
        asyncio.run(cluster_promoted(a))
    assert a.artifacts.seen[0][0] == "failover-refused"
    PromotionGrant("b", 999.0, "promote").write(a.watch.witness.grant)
    with pytest.raises(FailoverError, match="expired"):
        asyncio.run(cluster_promoted(a))


def test_goes_ahead_while_promoted(tmp_path: Path) -> None:
    a = agent(tmp_path, "pacemaker")
    PromotionGrant("b", 1100.0, "promote").write(a.watch.witness.grant)
    asyncio.run(cluster_promoted(a))
    assert a.artifacts.seen == []


def test_other_tiebreakers_are_not_asked(tmp_path: Path) -> None:
    a = agent(tmp_path, "witness")
    asyncio.run(cluster_promoted(a))  # no grant, yet no refusal: not the cluster's call
    assert a.artifacts.seen == []
