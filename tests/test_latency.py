"""Latency that means something: the original and the pruned model timed in interleaved
rounds until their ratio is stable, the spread printed next to the ratio, and a warning
whenever the figure cannot be read as a speed-up. Every timing here is fake (a simulated
machine advancing a simulated clock): no test depends on how busy this machine is."""
import numpy as np
import pytest

from pruning.report import (LATENCY_GMACS, LATENCY_TOLERANCE, latency_warnings, map_advice,
                            summary_table, time_latency)
from utils.torch_utils import RatioTiming, interleaved_ratio, ratio_spread


class Machine:
    """A simulated CPU: a call of `seconds` of work takes seconds * slowdown(now), and
    the clock moves by that much."""

    def __init__(self, slowdown):
        self.now, self.slowdown = 0.0, slowdown

    def clock(self):
        return self.now

    def work(self, seconds):
        def run():
            self.now += seconds * self.slowdown(self.now)
        return run


def _time(machine, first, second, **kwargs):
    return interleaved_ratio(machine.work(first), machine.work(second), clock=machine.clock,
                             tolerance=LATENCY_TOLERANCE, **kwargs)


def test_ratio_spread_is_the_median_and_half_the_interquartile_range_of_the_ratios():
    first = [1.0, 1.0, 2.0, 1.0, 4.0]
    second = [0.5, 0.7, 1.2, 0.4, 2.0]  # ratios 0.5, 0.7, 0.6, 0.4, 0.5
    ratio, spread = ratio_spread(first, second)
    assert ratio == pytest.approx(0.5)
    # sorted 0.4 0.5 0.5 0.6 0.7: quartiles 0.5 and 0.6
    assert spread == pytest.approx(0.05)


def test_a_quiet_machine_gives_the_true_ratio_after_the_first_rounds():
    rng = np.random.default_rng(0)
    machine = Machine(lambda now: rng.uniform(0.98, 1.02))
    t = _time(machine, 0.010, 0.006, min_rounds=5)
    assert t.stable and t.rounds == 5
    assert t.ratio == pytest.approx(0.6, rel=0.05)
    assert t.first == pytest.approx(0.010, rel=0.03) and t.second == pytest.approx(0.006, rel=0.03)
    assert latency_warnings({'pytorch': t, 'onnxruntime': None}) == []


def test_a_load_that_starts_midway_hits_both_models_alike():
    """A second process starts after 0.1 s and triples every call: timed one model after
    the other, the pruned model would look 1.8x slower; interleaved, the ratio holds."""
    machine = Machine(lambda now: 1.0 if now < 0.1 else 3.0)
    first, second = machine.work(0.010), machine.work(0.006)
    sequential = []
    for run in (first, second):
        start = machine.clock()
        for _ in range(10):
            run()
        sequential.append(machine.clock() - start)
    assert sequential[1] / sequential[0] > 1.5  # the "pruned six times slower"
    t = _time(Machine(lambda now: 1.0 if now < 0.1 else 3.0), 0.010, 0.006)
    assert t.ratio == pytest.approx(0.6, rel=0.01) and t.stable


@pytest.mark.parametrize('seed', range(40))
def test_a_busy_machine_never_shows_a_slower_pruned_model_without_a_warning(seed):
    """Bursts of a competing process slow any call 1.5-6x, at random: a figure above 1x,
    or one whose rounds disagree by more than the tolerance, always comes with a warning;
    a figure without one is within the tolerance of the truth."""
    rng = np.random.default_rng(seed)
    burst = rng.uniform(0.2, 0.8)  # the share of calls a burst hits
    machine = Machine(lambda now: rng.uniform(1.5, 6.0) if rng.random() < burst else 1.0)
    t = _time(machine, 0.010, 0.006, budget=0.5)
    warnings = latency_warnings({'pytorch': t})
    if t.ratio > 1 or not t.stable:
        assert len(warnings) == 1 and warnings[0].startswith('warning: PyTorch latency')
    else:
        assert warnings == []
        # quiet in the median: the figure printed without a warning is about right
        assert t.ratio == pytest.approx(0.6, rel=2 * LATENCY_TOLERANCE)


def test_the_budget_ends_a_timing_that_never_settles():
    rng = np.random.default_rng(1)
    machine = Machine(lambda now: rng.uniform(1.0, 5.0))
    t = _time(machine, 0.010, 0.006, budget=0.3, max_rounds=1000)
    assert not t.stable
    # the round that crossed the budget is the last one
    assert machine.now < 0.3 + 2 * 5 * 0.010 + 1e-9


def test_warnings_name_what_is_wrong():
    slower = RatioTiming(0.010, 0.012, 1.2, 0.02, 5, True)
    noisy = RatioTiming(0.010, 0.006, 0.6, 0.2, 40, False)
    fine = RatioTiming(0.010, 0.006, 0.6, 0.01, 5, True)
    lines = latency_warnings({'pytorch': slower, 'onnxruntime': noisy})
    assert 'PyTorch' in lines[0] and 'measured slower than the original' in lines[0]
    assert 'ONNX Runtime' in lines[1] and 'too busy to tell' in lines[1]
    assert latency_warnings({'pytorch': fine, 'onnxruntime': fine}) == []
    assert latency_warnings(None) == []


def _figures(map50, map50_95=None):
    return {'map50': map50, 'map50_95': map50_95, 'params': 1000, 'macs': 2e9,
            'size': 4020}


def test_the_last_column_says_what_each_row_is():
    before = _figures(0.5, 0.3)
    after = {**_figures(0.45, 0.25), 'params': 450, 'macs': 1e9, 'size': 1820,
             'map50_as_cut': None}
    timing = {'pytorch': RatioTiming(0.010, 0.0062, 0.62, 0.04, 7, True), 'onnxruntime': None}
    table = summary_table(before, after, timing)
    rows = {line.split('|')[1].strip(): line.split('|')[4].strip()
            for line in table.splitlines() if line.startswith('|')}
    assert rows[''] == 'pruned vs original'
    assert rows['mAP@0.5'] == '-0.0500 (difference)'
    assert rows['mAP@0.5:0.95'] == '-0.0500 (difference)'
    assert rows['parameters'] == '0.45x' and rows['GMACs'] == '0.50x'
    assert rows['PyTorch latency (ms, batch 1, BN fused)'] == '0.62x ± 0.04'
    assert 'ONNX Runtime latency (ms, batch 1)' not in rows
    skipped = summary_table(before, after, None)
    assert 'not measured (--latency)' in skipped


def test_latency_is_opt_in_above_the_size_limit():
    assert time_latency(None, LATENCY_GMACS * 1e9) is True
    assert time_latency(None, LATENCY_GMACS * 1e9 + 1) is False
    assert time_latency(True, 1e12) is True and time_latency(False, 1e6) is False


def test_advice_when_the_map_falls_by_more_than_half():
    assert map_advice(_figures(0.6), _figures(0.29)).startswith('advice: mAP@0.5 fell')
    assert 'fine-tune' in map_advice(_figures(0.6), _figures(0.05))
    assert map_advice(_figures(0.6), _figures(0.30)) is None
    assert map_advice(_figures(None), _figures(None)) is None
