"""When a worker gives memory back after a connection spike (workers/memtrim.py): the
decision, on a recorded trim function.  The effect on a real worker's RSS is checked
by test_exhaustion's 10,000-connection test."""

from __future__ import annotations

from gatewayd.workers.memtrim import MIN_PEAK, MemoryTrimmer, malloc_trim


def recorder() -> tuple[list[int], MemoryTrimmer]:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    return calls, MemoryTrimmer(trim)


def test_trims_once_the_connections_fall_to_half_of_their_peak() -> None:
    calls, trimmer = recorder()
    for n in (0, 100, 1000, 5000, 4000, 2600):
        assert not trimmer.observe(n)
    assert trimmer.observe(2500)  # half of the 5,000 peak
    assert calls == [0] and trimmer.trims == 1
    # the peak is now 2,500: the next trim waits for another halving
    assert not trimmer.observe(1300)
    assert trimmer.observe(1250)
    assert trimmer.trims == 2


def test_a_new_spike_sets_a_new_peak() -> None:
    calls, trimmer = recorder()
    trimmer.observe(4000)
    assert trimmer.observe(100)
    trimmer.observe(3000)
    assert not trimmer.observe(1600)
    assert trimmer.observe(1400)
    assert len(calls) == 2


def test_small_peaks_and_steady_load_never_trim() -> None:
    calls, trimmer = recorder()
    for n in (MIN_PEAK - 1, 0, MIN_PEAK - 1, 0):
        assert not trimmer.observe(n)
    for _ in range(100):  # steady load at a large count
        assert not trimmer.observe(3000)
    assert calls == []


def test_without_malloc_trim_nothing_is_called() -> None:
    trimmer = MemoryTrimmer(None)  # a C library without malloc_trim
    assert not trimmer.available
    trimmer.observe(10_000)
    assert not trimmer.observe(0)
    assert trimmer.trims == 0


def test_glibc_malloc_trim_is_found_here() -> None:
    """This machine runs glibc: the real function is loaded and callable."""
    trimmer = MemoryTrimmer(malloc_trim())
    assert trimmer.available
    trimmer.observe(MIN_PEAK)
    assert trimmer.observe(0)
