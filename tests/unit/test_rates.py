from ksmtrace.model.rates import Rates


def test_rates_from_zero_then_deltas() -> None:
    r = Rates()
    r.start(10.0)
    first = r.update(12.0, {1: {"ksm_cow": 10}})
    assert first[1]["ksm_cow"].delta == 10
    assert first[1]["ksm_cow"].per_s == 5.0
    second = r.update(13.0, {1: {"ksm_cow": 16}, 2: {"ksm_cow": 3}})
    assert second[1]["ksm_cow"].delta == 6
    assert second[1]["ksm_cow"].per_s == 6.0
    assert second[1]["ksm_cow"].total == 16
    assert second[2]["ksm_cow"].delta == 3  # new key: counted from zero


def test_pruned_key_restarts_from_zero() -> None:
    r = Rates()
    r.start(0.0)
    r.update(1.0, {7: {"x": 100}})
    r.update(2.0, {})  # pid 7 exited and was pruned
    again = r.update(3.0, {7: {"x": 4}})  # pid reused
    assert again[7]["x"].delta == 4
    reset = r.update(4.0, {7: {"x": 1}})  # counter went backwards: treat as reset
    assert reset[7]["x"].delta == 1


def test_unchanged_counters_give_zero_rates_with_their_totals() -> None:
    """Quiet keys (issue #14: a thousand idle processes) take the fast path:
    the same answer as a computed one, and a later change counts from the
    last value, not from where the quiet stretch began."""
    r = Rates()
    r.start(0.0)
    r.update(1.0, {1: {"x": 5, "y": 2}})
    for t in (2.0, 3.0):
        quiet = r.update(t, {1: {"x": 5, "y": 2}})
        assert {k: (v.delta, v.per_s, v.total) for k, v in quiet[1].items()} == {
            "x": (0, 0.0, 5),
            "y": (0, 0.0, 2),
        }
    moved = r.update(5.0, {1: {"x": 9, "y": 2}})
    assert (moved[1]["x"].delta, moved[1]["x"].per_s, moved[1]["x"].total) == (4, 2.0, 9)
    assert moved[1]["y"].delta == 0


def test_a_mapping_changed_by_its_caller_after_an_update_is_not_the_baseline() -> None:
    r = Rates()
    r.start(0.0)
    counts = {"x": 1}
    r.update(1.0, {1: counts})
    counts["x"] = 50  # the caller reuses its dict
    assert r.update(2.0, {1: {"x": 3}})[1]["x"].delta == 2
