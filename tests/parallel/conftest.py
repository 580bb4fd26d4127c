"""One long-lived gloo world per size for the whole session (see harness.py)."""

import pytest

from tests.parallel.harness import World

_worlds: dict[int, World] = {}


def _world(size: int) -> World:
    world = _worlds.get(size)
    if world is None or not world.alive:
        world = _worlds[size] = World(size)
    return world


@pytest.fixture
def world2():
    return _world(2)


@pytest.fixture
def world4():
    return _world(4)


def pytest_sessionfinish(session, exitstatus):
    for world in _worlds.values():
        world.close()
