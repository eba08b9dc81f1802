"""workers/serving.py: connections served on reused greenlets, bounded like gevent's Pool."""

from __future__ import annotations

import gevent
import pytest
from gatewayd.workers.serving import PARKED_KEPT, ServingGreenlets
from gevent.event import Event
from greenlet import getcurrent

GUARD = 5.0  # s: every wait below is bounded


def test_a_finished_greenlet_serves_the_next_connection() -> None:
    serving = ServingGreenlets(limit=10)
    ran_on = []
    for _ in range(3):
        serving.spawn(lambda: ran_on.append(getcurrent()))
        assert serving.join(GUARD)
    assert len(ran_on) == 3
    assert ran_on[0] is ran_on[1] is ran_on[2]  # one greenlet, reused
    assert len(serving) == 0


def test_spawn_blocks_at_the_limit_until_a_connection_ends() -> None:
    serving = ServingGreenlets(limit=2)
    release = [Event() for _ in range(3)]
    started: list[int] = []

    def job(i: int) -> None:
        started.append(i)
        release[i].wait(GUARD)

    spawner = gevent.spawn(lambda: [serving.spawn(job, i) for i in range(3)])
    with gevent.Timeout(GUARD):
        while len(started) < 2:
            gevent.sleep(0.01)
    gevent.sleep(0.05)
    assert started == [0, 1] and len(serving) == 2 and not spawner.dead  # third waits
    release[0].set()
    with gevent.Timeout(GUARD):
        spawner.join()
        while len(started) < 3:
            gevent.sleep(0.01)
    assert started == [0, 1, 2]
    for event in release:
        event.set()
    assert serving.join(GUARD)


def test_kill_ends_what_is_being_served_and_join_sees_it() -> None:
    serving = ServingGreenlets(limit=10)
    ended: list[str] = []

    def forever() -> None:
        try:
            gevent.sleep(60)
        except gevent.GreenletExit:
            ended.append("killed")
            raise

    for _ in range(3):
        serving.spawn(forever)
    gevent.sleep(0.05)
    assert len(serving) == 3 and not serving.join(0.01)
    serving.kill(timeout=GUARD)
    assert ended == ["killed"] * 3 and len(serving) == 0 and serving.join(0)
    done = Event()
    serving.spawn(done.set)  # and it still serves afterwards
    assert done.wait(GUARD)


def test_an_exception_in_a_connection_costs_only_its_greenlet() -> None:
    serving = ServingGreenlets(limit=10)

    def boom() -> None:
        raise RuntimeError("bug in one connection")

    serving.spawn(boom)
    assert serving.join(GUARD)
    done = Event()
    serving.spawn(done.set)
    assert done.wait(GUARD) and serving.join(GUARD)


@pytest.mark.parametrize("extra", [0, 5])
def test_at_most_parked_kept_greenlets_wait(extra: int) -> None:
    serving = ServingGreenlets(limit=PARKED_KEPT + 10)
    release = Event()
    for _ in range(PARKED_KEPT + extra):
        serving.spawn(release.wait, GUARD)
    gevent.sleep(0.05)
    release.set()
    assert serving.join(GUARD)
    gevent.sleep(0.05)
    assert len(serving._parked) == PARKED_KEPT  # the extra ones ended
