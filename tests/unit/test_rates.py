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
