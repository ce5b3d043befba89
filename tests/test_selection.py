"""Plan selection: the sensitivity allocation and `--criterion auto`.

The allocation's pieces are checked by hand (widths allowed, interpolation, the greedy
order on made-up curves) and its plans against the compact model's counted cost; auto
against a scorer whose answers the test fixes, and its CLI run against the candidate it
reports, re-pruned by the single-criterion road.
"""
import math
import os

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from darknet.model import Darknet
from pruning import selection
from pruning.criteria import CRITERIA
from pruning.plan import compact_cost
from pruning.sensitivity import (allowed_counts, curve_at, greedy_widths, loss_curves,
                                 measured_counts, sensitivity_plan)
from pruning.settings import AUTO, FALLBACK_CRITERION, PruneSettings
from pruning.surgery import prune
from utils.torch_utils import count_parameters

IMG = 64
SMALL = os.path.join(TEST_CFGS, 'small_detector.cfg')
RESIDUAL = os.path.join(TEST_CFGS, 'residual_chain.cfg')


def _model(cfg=SMALL, seed=0):
    return randomize_weights(Darknet(cfg), seed).eval()


def _batches(seed=0, count=3):
    """Random images with a few boxes each: (images, targets (n, 6))."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor([[0, 0, 0.3, 0.4, 0.2, 0.3], [0, 1, 0.7, 0.6, 0.4, 0.2],
                            [1, 1, 0.5, 0.5, 0.5, 0.6]])
    return [(torch.rand(2, 3, IMG, IMG, generator=generator), targets.clone())
            for _ in range(count)]


# ---------------------------------------------------------------- sensitivity, by hand

def test_allowed_widths_are_rounded_and_floored():
    assert allowed_counts(64, 8, 'tiny', 0.1) == [64, 56, 48, 40, 32, 24, 16, 8]
    assert allowed_counts(60, 8, 'tiny', 0.5) == [60, 56, 48, 40, 32]
    assert allowed_counts(100, None, 'regular', None) == [100, 64, 32, 16, 8]
    assert allowed_counts(5, None, 'tiny', None) == [5, 4, 3, 2, 1]
    assert measured_counts([64, 56, 48, 40, 32, 24, 16, 8]) == [48, 32, 16, 8]


def test_curve_is_linear_between_measured_widths():
    curve = ([64, 48, 32], [0.0, 1.0, 3.0])
    assert curve_at(curve, 64) == 0.0
    assert curve_at(curve, 56) == pytest.approx(0.5)
    assert curve_at(curve, 40) == pytest.approx(2.0)
    assert curve_at(curve, 32) == 3.0


def test_greedy_cuts_the_insensitive_unit_first_and_stops_at_the_need():
    allowed = [[8, 6, 4, 2], [8, 6, 4, 2]]
    curves = [([8, 2], [0.0, 0.06]), ([8, 2], [0.0, 6.0])]  # unit 1 is 100x as sensitive
    savings = [torch.ones(8), torch.ones(8)]
    index = greedy_widths(curves, allowed, savings, need=6, reached=lambda index: True)
    assert index == [3, 0]  # 6 channels, all from unit 0
    index = greedy_widths(curves, allowed, savings, need=8, reached=lambda index: True)
    assert index == [3, 1]


def test_greedy_prefers_the_step_that_saves_more_per_loss():
    allowed = [[8, 4], [8, 4]]
    curves = [([8, 4], [0.0, 1.0]), ([8, 4], [0.0, 1.0])]  # equal losses ...
    savings = [torch.ones(8), torch.full((8,), 10.0)]       # ... unit 1 saves 10x
    assert greedy_widths(curves, allowed, savings, 1, lambda index: True) == [0, 1]


def test_loss_curves_rise_where_a_unit_is_cut():
    model, batches = _model(), _batches()
    from pruning.plan import rank_channels
    ranking = rank_channels(model, 'tiny', 'lamp')
    orders = [key.argsort(descending=True) for key in ranking.keys]
    allowed = [allowed_counts(len(key), 1, 'tiny', 0.1) for key in ranking.keys]
    curves = loss_curves(model, ranking.units, orders, allowed, batches)
    for (widths, rises), counts in zip(curves, allowed):
        assert widths[0] == counts[0] and rises[0] == 0.0
        assert all(b >= a for a, b in zip(rises, rises[1:]))  # monotone
    assert max(rises[-1] for _, rises in curves) > 0  # cutting to 10% costs something


@pytest.mark.parametrize('cfg,mode', [(SMALL, 'tiny'), (RESIDUAL, 'shortcut')])
@pytest.mark.parametrize('target', [0.3, 0.6])
def test_sensitivity_plan_reaches_the_target_with_floors_and_rounding(cfg, mode, target):
    model = _model(cfg)
    settings = PruneSettings(criterion='lamp', allocate='sensitivity',
                             target=('params', target)).resolve(mode, has_train=True)
    plan = sensitivity_plan(model, mode, settings, IMG, _batches())
    params, _ = compact_cost(model, plan.masks, IMG)
    assert 1 - params / count_parameters(model) >= target
    assert plan.removed == pytest.approx(1 - params / count_parameters(model))
    compact = prune(model, plan)[1]
    assert count_parameters(compact) == params  # the counted cost is the built model's
    for unit in plan.units:
        mask = plan.masks[unit[0]]
        kept = int(mask.sum())
        assert kept >= math.ceil(settings.layer_keep * len(mask))
        assert kept == len(mask) or kept % settings.round_to == 0


def test_sensitivity_plan_at_a_percent_cuts_that_share_of_the_channels():
    model = _model()
    settings = PruneSettings(criterion='lamp', allocate='sensitivity', percent=0.5,
                             round_to=1).resolve('tiny', has_train=True)
    plan = sensitivity_plan(model, 'tiny', settings, IMG, _batches())
    total = sum(len(plan.masks[u[0]]) for u in plan.units)
    cut = sum(int((~plan.masks[u[0]]).sum()) for u in plan.units)
    assert cut >= 0.5 * total and cut - 0.5 * total < max(len(plan.masks[u[0]]) for u in plan.units)
    assert plan.percent == pytest.approx(cut / total)


def test_sensitivity_without_training_images_is_refused():
    from utils.errors import UserInputError
    with pytest.raises(UserInputError, match='--allocate sensitivity'):
        PruneSettings(allocate='sensitivity').resolve('tiny', has_train=False)


# ---------------------------------------------------------------- auto

def test_auto_without_training_images_falls_back_to_the_data_free_criterion():
    assert PruneSettings().criterion == AUTO
    assert PruneSettings().resolve('tiny').criterion == FALLBACK_CRITERION


def test_auto_tries_every_criterion_both_ways_and_the_allocation():
    tried = PruneSettings(target=('params', 0.5)).resolve('tiny', True).candidates('tiny', True)
    pairs = {(s.criterion, s.cost, s.allocate) for s in tried}
    for name in CRITERIA:
        assert {(name, 'none', 'threshold'), (name, 'params', 'threshold')} <= pairs
    assert any(s.allocate == 'sensitivity' for s in tried)
    gmacs = PruneSettings(target=('gmacs', 0.5)).resolve('tiny', True).candidates('tiny', True)
    assert {s.cost for s in gmacs} == {'none', 'macs'}


def test_auto_keeps_distinct_plans_only_and_loses_no_candidate():
    model, batches = _model(), _batches()
    settings = PruneSettings(target=('params', 0.5)).resolve('tiny', True)
    found = selection.candidate_plans(model, 'tiny', settings, IMG, batches)
    keys = {tuple(bytes(c.plan.masks[i].numpy()) for i in sorted(c.plan.masks)) for c in found}
    assert len(keys) == len(found)
    assert sum(len(c.settings) for c in found) == len(settings.candidates('tiny', True))


def test_auto_chooses_the_best_scored_candidate(monkeypatch):
    """With the scorer fixed to a value per candidate, auto keeps the best: scores
    decreasing in the order tried, so the first distinct plan must win both rounds."""
    model, batches = _model(), _batches()
    order = []

    def fake_score(model, plan, calibration, held_out):
        if plan not in order:
            order.append(plan)
        return 1.0 / (1 + order.index(plan))

    monkeypatch.setattr(selection, 'held_out_map', fake_score)
    settings = PruneSettings(target=('params', 0.5)).resolve('tiny', True)
    plan = selection.choose_plan(model, 'tiny', settings, IMG, batches, held_out=_batches(1))
    assert plan is order[0]
    assert [len(c.scores) for c in plan.candidates[:selection.FINALISTS]] == [2] * 3
    assert all(len(c.scores) == 1 for c in plan.candidates[selection.FINALISTS:])
    assert plan.settings in plan.candidates[0].settings


def test_split_images_gives_back_every_image_and_its_boxes():
    batches = _batches(count=2)  # 2 images each; image 0 has 2 boxes, image 1 has 1
    first, rest = selection.split_images(batches, 3)
    assert sum(len(i) for i, _ in first) == 3 and sum(len(i) for i, _ in rest) == 1
    assert torch.equal(torch.cat([i for i, _ in first + rest]),
                       torch.cat([i for i, _ in batches]))
    assert len(rest[0][1]) == 1 and rest[0][1][0, 0] == 0  # image 1 of batch 2, renumbered
    assert sum(len(t) for _, t in first + rest) == sum(len(t) for _, t in batches)


def test_auto_run_writes_the_plan_of_the_candidate_it_reports(tmp_path):
    """The demo prune with auto against the single-criterion road with the settings auto
    reports it chose: the same masks."""
    from cli.prune import main
    result = main('tiny', ['--percent', '0.5', '--output-dir', str(tmp_path / 'auto')])
    plan = result['plan']
    assert plan.candidates and plan.settings.criterion != AUTO
    chosen = plan.settings
    floor = (['--max-layer-prune', '1'] if chosen.layer_keep is None
             else ['--layer-keep', str(chosen.layer_keep)])
    again = main('tiny', ['--percent', '0.5', '--criterion', chosen.criterion, '--cost',
                          chosen.cost, '--allocate', chosen.allocate, '--output-dir',
                          str(tmp_path / 'single')] + floor)['plan']
    assert all(torch.equal(plan.masks[i], again.masks[i]) for i in plan.masks)


# ---------------------------------------------------------------- --percent, one meaning

@pytest.mark.parametrize('criterion', ['gamma', 'lamp', 'gamma-l2'])
def test_percent_is_the_share_of_prunable_channels_under_every_criterion(criterion):
    """Without floors or rounding, --percent P cuts floor(P * channels) of them, a
    shortcut group's channel counted once, whatever the criterion."""
    model = _model(RESIDUAL)
    settings = PruneSettings(criterion=criterion, cost='none', percent=0.3, layer_keep=None,
                             max_layer_prune=1, round_to=1).resolve('shortcut')
    plan = selection.choose_plan(model, 'shortcut', settings, IMG)
    total = sum(len(plan.masks[u[0]]) for u in plan.units)
    cut = sum(int((~plan.masks[u[0]]).sum()) for u in plan.units)
    assert cut == int(0.3 * total)


def test_a_percent_the_floors_cap_is_refused_unless_accepted():
    from utils.errors import UserInputError
    model = _model()
    settings = PruneSettings(criterion='uniform', percent=0.95, max_layer_prune=0.5)
    with pytest.raises(UserInputError, match='--allow-capped'):
        selection.choose_plan(model, 'tiny', settings.resolve('tiny'), IMG)
    plan = selection.choose_plan(model, 'tiny', PruneSettings(
        **{**settings.__dict__, 'allow_capped': True}).resolve('tiny'), IMG)
    for unit in plan.units:
        assert int(plan.masks[unit[0]].sum()) >= len(plan.masks[unit[0]]) // 2
