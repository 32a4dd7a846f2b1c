"""The serving process's garbage-collector settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.process.gc_tuning import YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Whatever a test does to the collector is undone afterwards."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_start_up_objects_are_frozen(restored_gc: None) -> None:
    """Objects that exist when the heap is settled are left out of later collections."""
    gc.unfreeze()
    long_lived = [object()]  # a container, so the collector tracks it
    assert any(o is long_lived for o in gc.get_objects())
    settle_heap()
    assert not any(o is long_lived for o in gc.get_objects())


@pytest.mark.parametrize("generation", [0, 1, 2])
def test_only_the_young_threshold_changes(restored_gc: None, generation: int) -> None:
    """Young collections wait for YOUNG_THRESHOLD allocations; older generations keep their settings."""
    before = gc.get_threshold()
    settle_heap()
    expected = YOUNG_THRESHOLD if generation == 0 else before[generation]
    assert gc.get_threshold()[generation] == expected
