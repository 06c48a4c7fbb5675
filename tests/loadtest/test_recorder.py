"""The generator's fast histogram recording gives exactly what hdrh's own methods give."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.recorder import HIGHEST_US, LOWEST_US, Stats, clear, new_histogram, record

# Latencies in microseconds, out-of-range ones included (they are clamped, never dropped).
values = st.lists(
    st.one_of(
        st.integers(min_value=-5, max_value=5_000),
        st.integers(min_value=5_000, max_value=HIGHEST_US),
        st.integers(min_value=HIGHEST_US, max_value=10 * HIGHEST_US),
    ),
    max_size=300,
)


@given(values)
@settings(max_examples=200, deadline=None)
def test_record_matches_hdrh_record_value(vs: list[int]) -> None:
    fast, slow = new_histogram(), new_histogram()
    for v in vs:
        record(fast, v)
        slow.record_value(min(max(v, LOWEST_US), HIGHEST_US))
    assert fast.encode() == slow.encode()
    assert fast.get_total_count() == slow.get_total_count() == len(vs)
    assert fast.get_min_value() == slow.get_min_value()
    assert fast.get_max_value() == slow.get_max_value()
    for p in (50.0, 99.0, 99.9, 100.0):
        assert fast.get_value_at_percentile(p) == slow.get_value_at_percentile(p)


@given(values, values)
@settings(max_examples=50, deadline=None)
def test_clear_matches_hdrh_reset(before: list[int], after: list[int]) -> None:
    fast, slow = new_histogram(), new_histogram()
    for v in before:
        record(fast, v)
        record(slow, v)
    clear(fast)
    slow.reset()
    assert vars(fast).keys() == vars(slow).keys()
    for name in ("total_count", "min_value", "max_value", "start_time_stamp_msec",
                 "end_time_stamp_msec"):
        assert getattr(fast, name) == getattr(slow, name)
    assert list(fast.counts) == list(slow.counts)
    for v in after:
        record(fast, v)
        record(slow, v)
    assert fast.encode() == slow.encode()


def test_an_outlier_beyond_the_range_is_kept_at_the_top() -> None:
    s = Stats()
    s.latency("send_deliver", 30_000.7)
    s.latency("send_deliver", HIGHEST_US * 3.0)
    h = s.hists["send_deliver"]
    assert h.get_total_count() == 2
    assert h.get_max_value() >= HIGHEST_US
    snap = s.take()
    assert set(snap["hists"]) == {"send_deliver"}
    assert h.get_total_count() == 0  # the next interval starts empty
