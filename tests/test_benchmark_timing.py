"""CPU tests of benchmarks/timing.py: round-robin order, warm-up exclusion, drift and order-effect cancellation."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_timing", Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)


class DriftClock:
    """Fake timer: a call of variant v 'takes' cost[v] * (1 + drift * n) ms, n = calls so far
    (a GPU whose clock slows down steadily over the run)."""

    def __init__(self, cost: dict[str, float], drift: float):
        self.cost, self.drift, self.n, self.current, self.order = cost, drift, 0, None, []

    def call(self, name: str):
        def run():
            self.current = name
            self.order.append(name)
        return run

    def start(self):
        return None

    def stop(self, started):
        took = self.cost[self.current] * (1 + self.drift * self.n)
        self.n += 1
        return took

    def elapsed_ms(self, stopped):
        return stopped

    def wait(self):
        pass


def test_round_robin_order_and_warmup_excluded():
    clock = DriftClock({"a": 1.0, "b": 2.0, "c": 3.0}, drift=0.0)
    out = timing.interleaved_ms({n: clock.call(n) for n in "abc"}, rounds=4, warmup=2, timer=clock, seed=None)
    assert clock.order == list("abc") * 6
    assert out == {"a": 1.0, "b": 2.0, "c": 3.0}


def test_interleaving_cancels_clock_drift():
    cost = {"base": 1.0, "ours": 1.1}
    clock = DriftClock(cost, drift=0.005)
    out = timing.interleaved_ms({n: clock.call(n) for n in cost}, rounds=21, warmup=3, timer=clock)
    assert out["ours"] / out["base"] == pytest.approx(1.1, abs=0.006)
    # the same drift, the variants timed one after the other: the ratio is off by ~10%
    seq = DriftClock(cost, drift=0.005)
    one_by_one = {n: timing.interleaved_ms({n: seq.call(n)}, rounds=21, warmup=3, timer=seq)[n] for n in cost}
    assert one_by_one["ours"] / one_by_one["base"] > 1.1 * 1.09


def test_wall_timer_measures_host_time():
    out = timing.interleaved_ms({"sleep": lambda: __import__("time").sleep(0.002)}, rounds=3, warmup=0,
                                timer=timing.WallTimer())
    assert 1.5 <= out["sleep"] <= 50.0


@pytest.mark.parametrize("rounds, warmup", [(0, 3), (5, -1)])
def test_bad_rounds_rejected(rounds, warmup):
    with pytest.raises(ValueError, match=f"rounds={rounds}, warmup={warmup}"):
        timing.interleaved_ms({"a": lambda: None}, rounds=rounds, warmup=warmup, timer=timing.WallTimer())


@pytest.mark.parametrize("seconds", [0, -1.0])
def test_burn_in_rejects_a_non_positive_duration(seconds):
    with pytest.raises(ValueError, match=f"seconds must be > 0, got {seconds}"):
        timing.burn_in(seconds=seconds)


class StepClock(DriftClock):
    """DriftClock whose speed halves after ``switch`` calls (a GPU dropping to sustained clocks)."""

    def __init__(self, cost, switch):
        super().__init__(cost, drift=0.0)
        self.switch = switch

    def stop(self, started):
        took = self.cost[self.current] * (2.0 if self.n >= self.switch else 1.0)
        self.n += 1
        return took


def test_ratios_per_round_survive_a_clock_step_and_shuffle_the_order():
    cost = {"cublas": 1.0, "ours": 1.05, "other": 0.9}
    clock = StepClock(cost, switch=10)
    out = timing.interleaved_ratios({n: clock.call(n) for n in cost}, reference="cublas", rounds=12, warmup=1, timer=clock)
    # a round that straddles the step mixes both clocks: the median still gives the true ratio
    assert out["ours"][0] == pytest.approx(1.05) and out["other"][0] == pytest.approx(0.9)
    assert out["cublas"] == (1.0, 0.0)
    rounds = [clock.order[i:i + 3] for i in range(0, len(clock.order), 3)]
    assert all(sorted(r) == sorted(cost) for r in rounds) and len({tuple(r) for r in rounds}) > 1


class NeighbourClock(DriftClock):
    """Fake timer of a power-capped GPU: a call runs ``bonus`` faster when the call before it was of
    the light variant ``light`` (the GPU comes to it cooler)."""

    def __init__(self, cost: dict[str, float], light: str, bonus: float):
        super().__init__(cost, drift=0.0)
        self.light, self.bonus = light, bonus

    def stop(self, started):
        previous = self.order[-2] if len(self.order) > 1 else None
        return self.cost[self.current] * (1 - self.bonus if previous == self.light else 1)


def test_shuffled_rounds_spread_the_neighbour_effect_over_the_variants():
    cost = {"floor": 1.0, "new": 1.06, "old": 1.06}  # new and old: equally fast
    fixed = NeighbourClock(cost, light="floor", bonus=0.02)
    out = timing.interleaved_ms({n: fixed.call(n) for n in cost}, rounds=40, warmup=2, timer=fixed, seed=None)
    assert out["new"] < out["old"]  # the fixed order hands "new" (always right after the floor) a fake gain
    shuffled = NeighbourClock(cost, light="floor", bonus=0.02)
    out = timing.interleaved_ms({n: shuffled.call(n) for n in cost}, rounds=41, warmup=2, timer=shuffled)
    orders = {tuple(shuffled.order[i:i + 3]) for i in range(0, len(shuffled.order), 3)}
    assert len(orders) > 1 and all(sorted(o) == sorted(cost) for o in orders)
    # each round's call after the floor is either variant; the medians match the true costs again
    assert out["new"] == pytest.approx(1.06) and out["old"] == pytest.approx(1.06)


def test_ratios_reject_an_unknown_reference():
    with pytest.raises(ValueError, match="reference='cuBLAS' is not one of the calls"):
        timing.interleaved_ratios({"cublas": lambda: None}, reference="cuBLAS", rounds=2, timer=timing.WallTimer())
