"""Channel criteria, cost-aware selection and BN recalibration (pruning/criteria.py,
pruning.plan.rank_channels / pruning.calibration.recalibrate_bn).

The central check is a second road to the same model: scaling one layer's gamma and
beta by a and its consumer's BatchNorm statistics by a and a^2 gives a model with the
same outputs. A criterion comparable across layers must rank that model's channels as
it ranks the original's; raw |gamma| must not (the control that shows the test bites).
"""
import math
import os

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from darknet.loss import compute_loss
from darknet.model import Darknet
from pruning.calibration import recalibrate_bn
from pruning.costs import channel_costs
from pruning.criteria import CRITERIA, _lamp, get_criterion
from pruning.graph import prunable_units
from pruning.plan import compact_cost, find_percent, plan_masks, rank_channels
from pruning.surgery import prune
from utils.torch_utils import count_macs, count_parameters

IMG = 64
SMALL = os.path.join(TEST_CFGS, 'small_detector.cfg')
SCALED, CONSUMER = 2, 4  # in SMALL: conv 2's only reader is conv 4 (after a maxpool)
INVARIANT = [c for c in CRITERIA if c != 'gamma']


def _model(cfg=SMALL, seed=0, dtype=torch.float32):
    return randomize_weights(Darknet(cfg), seed).eval().to(dtype)


def _batches(seed=0, count=2, dtype=torch.float32):
    """Random images with a few boxes each: (images, targets (n, 6) image, class, cx, cy, w, h)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        imgs = torch.rand(2, 3, IMG, IMG, generator=generator).to(dtype)
        targets = torch.tensor([[0, 0, 0.3, 0.4, 0.2, 0.3], [0, 1, 0.7, 0.6, 0.4, 0.2],
                                [1, 1, 0.5, 0.5, 0.5, 0.6]], dtype=dtype)
        batches.append((imgs, targets))
    return batches


def _rescaled(model, a=10.0):
    """The same function with conv SCALED's output a times larger, undone by CONSUMER's BN."""
    twin = _model()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        bn = twin.module_list[SCALED].BatchNorm2d
        bn.weight.mul_(a)
        bn.bias.mul_(a)
        reader = twin.module_list[CONSUMER].BatchNorm2d
        reader.running_mean.mul_(a)
        reader.running_var.mul_(a * a)
    return twin.eval()


def test_rescaled_model_is_the_same_function():
    model = _model()
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(_rescaled(model)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('criterion', INVARIANT)
def test_criterion_ranks_a_rescaled_layer_as_before(criterion):
    model = _model()
    info, units, _ = prunable_units(model, 'tiny')
    batches = _batches()
    before = get_criterion(criterion).scores(model, info, units, batches)
    after = get_criterion(criterion).scores(_rescaled(model), info, units, batches)
    for unit, b, a in zip(units, before, after):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6, msg=f'unit {unit}')


def test_raw_gamma_is_not_scale_invariant_and_empties_the_small_layer_first():
    """The control: under raw |gamma| the 10x layer keeps everything at 50% while the
    others are cut harder; every invariant criterion cuts the rescaled model as before."""
    model = _model()
    twin = _rescaled(model)
    plain = plan_masks(twin, 'tiny', 0.5, layer_keep=0.01)
    assert plain.masks[SCALED].all()
    for criterion in ('uniform', 'gamma-mean', 'gamma-l2', 'lamp', 'consumer'):
        ranked = [plan_masks(m, 'tiny', 0.5, layer_keep=0.01,
                             ranking=rank_channels(m, 'tiny', criterion))
                  for m in (model, twin)]
        for i in ranked[0].masks:
            assert torch.equal(ranked[0].masks[i], ranked[1].masks[i]), (criterion, i)


def test_uniform_cuts_the_same_share_of_every_layer():
    model = _model()
    plan = plan_masks(model, 'tiny', 0.5, ranking=rank_channels(model, 'tiny', 'uniform'))
    for unit in plan.units:
        mask = plan.masks[unit[0]]
        assert abs(int((~mask).sum()) - len(mask) / 2) <= 1, unit


def test_filter_norm_is_each_filters_l1_over_its_convs_mean_by_hand():
    """filter-norm (Li et al. 2017) against loops over the weights; a shortcut group
    takes its best branch."""
    for cfg, mode in (('small_detector.cfg', 'tiny'), ('residual_chain.cfg', 'shortcut')):
        model = _model(os.path.join(TEST_CFGS, cfg), seed=3)
        info, units, _ = prunable_units(model, mode)
        scores = get_criterion('filter-norm').scores(model, info, units)
        for unit, got in zip(units, scores):
            per_conv = []
            for i in unit:
                weight = model.module_list[i].Conv2d.weight.detach()
                norms = [sum(abs(float(v)) for v in weight[o].flatten())
                         for o in range(weight.shape[0])]
                per_conv.append([n / (sum(norms) / len(norms)) for n in norms])
            expected = [max(conv[c] for conv in per_conv if c < len(conv))
                        for c in range(max(len(conv) for conv in per_conv))]
            torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_a_new_criterion_is_one_class(tmp_path, monkeypatch):
    """Defining a Criterion subclass registers it: --criterion takes it, and the plan
    cuts what its scores say (here: the channels with the highest index go first)."""
    from pruning import criteria

    monkeypatch.setattr(criteria, 'CRITERIA', dict(criteria.CRITERIA))

    class LastFirst(criteria.Criterion):
        name = 'last-first'
        default_cost = None
        default_max_layer_prune = None

        def scores(self, model, info, units, batches=None):
            return [torch.arange(len(model.module_list[u[0]].BatchNorm2d.weight), 0, -1.0)
                    for u in units]

    assert 'last-first' in criteria.CRITERIA
    model = _model()
    plan = plan_masks(model, 'tiny', 0.3, ranking=rank_channels(model, 'tiny', 'last-first'))
    for unit in plan.units:
        mask = plan.masks[unit[0]]
        kept = int(mask.sum())
        assert mask[:kept].all() and not mask[kept:].any(), unit


def test_lamp_scores_by_hand():
    # squares 1, 4, 9: 1 / (1 + 4 + 9), 4 / (4 + 9), 9 / 9, in the gammas' own order
    scores = _lamp(torch.tensor([2.0, 1.0, 3.0]))
    torch.testing.assert_close(scores, torch.tensor([4 / 13, 1 / 14, 1.0]))


@pytest.mark.parametrize('cfg,mode', [('small_detector.cfg', 'tiny'),
                                      ('residual_chain.cfg', 'shortcut')])
def test_taylor_is_the_derivative_of_the_loss_along_gamma(cfg, mode, monkeypatch):
    """(sum over a unit's convs of gamma * dL/dgamma)^2 against a central difference of
    the loss when the unit's gammas of one channel scale together, in float64. The
    loss's two terms that autograd holds constant by design are off (the objectness
    target's IoU, CIoU's alpha: obj_iou 0 and plain IoU), since a difference quotient
    would follow them."""
    import pruning.criteria
    smooth_loss = lambda heads, targets, model: compute_loss(heads, targets, model,
                                                              {'obj_iou': 0.0, 'iou_type': 'iou'})
    monkeypatch.setattr(pruning.criteria, 'compute_loss', smooth_loss)
    cfg = os.path.join(TEST_CFGS, cfg)
    model = _model(cfg, dtype=torch.float64)
    info, units, _ = prunable_units(model, mode)
    assert mode != 'shortcut' or any(len(u) > 1 for u in units)
    batches = _batches(count=1, dtype=torch.float64)
    scores = get_criterion('taylor').scores(model, info, units, batches)
    imgs, targets = batches[0]

    def loss_with(unit, channel, factor):
        twin = _model(cfg, dtype=torch.float64)
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            for i in unit:
                twin.module_list[i].BatchNorm2d.weight[channel] *= factor
        return float(smooth_loss(twin.eval()(imgs, raw=True), targets, twin)[0].detach())

    eps = 1e-5
    for u, unit in enumerate(units):
        for channel in (0, len(scores[u]) - 1):
            # d/dt L(gamma * (1 + t)) at t = 0 is the sum of gamma * dL/dgamma
            slope = (loss_with(unit, channel, 1 + eps) - loss_with(unit, channel, 1 - eps)) / (2 * eps)
            assert float(scores[u][channel]) == pytest.approx(slope ** 2, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize('cfg,mode', [('small_detector.cfg', 'tiny'), ('residual_chain.cfg', 'shortcut'),
                                      ('residual_chain.cfg', 'normal'), ('features.cfg', 'normal')])
@pytest.mark.parametrize('measure', ['params', 'macs'])
def test_channel_cost_is_what_removing_that_channel_saves(cfg, mode, measure):
    """Against the built compact model: cut exactly one channel of one unit, count."""
    model = _model(os.path.join(TEST_CFGS, cfg))
    info, units, _ = prunable_units(model, mode)
    costs = channel_costs(model, info, units, measure, IMG)
    index = 0 if measure == 'params' else 1
    full = (count_parameters(model), count_macs(model, IMG))[index]
    for unit, cost in zip(units, costs):
        masks = {i: torch.ones(model.module_list[i].Conv2d.out_channels, dtype=torch.bool)
                 for i in info.bn_convs}
        for i in unit:
            masks[i][1] = False
        saved = full - compact_cost(model, masks, IMG)[index]
        assert float(cost[1]) == saved, unit


def test_cost_aware_target_is_reached_and_minimal():
    model = _model(os.path.join(TEST_CFGS, 'residual_chain.cfg'))
    ranking = rank_channels(model, 'shortcut', 'gamma-l2', 'params', IMG)
    percent, plan, share = find_percent(model, 'shortcut', 0.4, 'params', IMG, 0.1,
                                        ranking=ranking)
    compact = prune(model, plan)[1]
    assert 1 - count_parameters(compact) / count_parameters(model) == pytest.approx(share)
    assert share >= 0.4
    smaller = plan_masks(model, 'shortcut', percent - 1e-4, 0.1, ranking=ranking)
    assert 1 - compact_cost(model, smaller.masks, IMG)[0] / count_parameters(model) < 0.4


def test_cost_aware_ranking_cuts_expensive_channels_first():
    """Two units with equal normalised scores: per parameter, the dearer one goes first."""
    model = _model()
    info, units, _ = prunable_units(model, 'tiny')
    costs = channel_costs(model, info, units, 'params')
    ranking = rank_channels(model, 'tiny', 'uniform', 'params')
    dear = max(range(len(units)), key=lambda u: float(costs[u].mean()))
    cheap = min(range(len(units)), key=lambda u: float(costs[u].mean()))
    plan = plan_masks(model, 'tiny', 0.3, 0.01, ranking=ranking)
    share = {u: 1 - float(plan.masks[units[u][0]].float().mean()) for u in (dear, cheap)}
    assert share[dear] > share[cheap]


def test_layer_floor_holds_for_every_unit():
    model = _model(os.path.join(TEST_CFGS, 'residual_chain.cfg'))
    ranking = rank_channels(model, 'shortcut', 'taylor', 'params', IMG, _batches())
    plan = plan_masks(model, 'shortcut', 0.95, layer_keep=0.1, ranking=ranking)
    for unit in plan.units:
        mask = plan.masks[unit[0]]
        assert int(mask.sum()) >= math.ceil(0.1 * len(mask)), unit


def test_round_to_in_every_mode_never_keeps_fewer():
    model = _model(os.path.join(TEST_CFGS, 'residual_chain.cfg'))
    for mode in ('normal', 'shortcut'):
        plain = plan_masks(model, mode, 0.6, layer_keep=0.01)
        rounded = plan_masks(model, mode, 0.6, layer_keep=0.01, round_to=8)
        for unit in rounded.units:
            kept, width = int(rounded.masks[unit[0]].sum()), len(rounded.masks[unit[0]])
            assert kept % 8 == 0 or kept == width, (mode, unit, kept)
            # every channel the criterion kept is still kept
            assert bool((rounded.masks[unit[0]] | ~plain.masks[unit[0]]).all())


# ---------------------------------------------------------------- recalibration

def test_recalibrated_first_bn_holds_the_mean_and_variance_of_its_input():
    """Conv 0 sees the images directly: its BN statistics after recalibration are the
    per-batch mean and unbiased variance of conv 0's output, averaged over the batches."""
    model = _model()
    batches = _batches(count=3)
    kept = _copy(model)
    recalibrate_bn(kept, batches)  # the default: means only
    recalibrate_bn(model, batches, variances=True)
    conv = model.module_list[0].Conv2d
    with torch.no_grad():
        outputs = [conv(imgs) for imgs, _ in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outputs]).mean(0)
    bn = model.module_list[0].BatchNorm2d
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, variances, rtol=1e-4, atol=1e-5)
    assert not model.training and bn.momentum == pytest.approx(0.03)
    for ours, theirs in zip(kept.modules(), model.modules()):
        if isinstance(ours, torch.nn.BatchNorm2d):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(kept.module_list[0].BatchNorm2d.running_var,
                               _model().module_list[0].BatchNorm2d.running_var)


def test_recalibration_leaves_a_matching_model_unchanged():
    model = recalibrate_bn(_model(), _batches(count=2), variances=True)
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        before = model(x)
        after = recalibrate_bn(model, _batches(count=2), variances=True)(x)
    torch.testing.assert_close(after, before)


def test_recalibration_brings_a_pruned_models_statistics_to_its_data():
    """After a cut, the kept BN statistics no longer describe what each layer sees;
    recalibrated, a train-mode pass over the same data (batch statistics) and the
    eval-mode model agree far better than before."""
    model = _model(os.path.join(TEST_CFGS, 'residual_chain.cfg'))
    plan = plan_masks(model, 'shortcut', 0.7, layer_keep=0.05,
                      ranking=rank_channels(model, 'shortcut', 'uniform'))
    compact = prune(model, plan)[1]
    batches = _batches(count=1)
    imgs = batches[0][0]

    def gap(m):
        with torch.no_grad():
            train_out = torch.cat([h.flatten() for h in m.train()(imgs)])
            eval_out = torch.cat([h.flatten() for h in m.eval()(imgs, raw=True)])
        return float((train_out - eval_out).abs().mean())

    # train mode changes running stats: measure on copies
    before = gap(_copy(compact))
    after = gap(_copy(recalibrate_bn(compact, batches, variances=True)))
    assert after < 0.5 * before


def _copy(model):
    import copy
    return copy.deepcopy(model)


# ---------------------------------------------------------------- the scripts

def _run(argv, tmp_path):
    from cli.prune import main
    return main('tiny', ['--cfg', SMALL, '--img-size', str(IMG), '--output-dir',
                         str(tmp_path)] + argv)


@pytest.fixture
def small_weights(tmp_path):
    from darknet.weights import save_weights
    path = str(tmp_path / 'small.weights')
    save_weights(_model(), path)
    return path


@pytest.mark.parametrize('argv,words', [
    (['--criterion', 'nonsense'], 'invalid choice'),
    (['--calibrate', '8'], '--calibrate 8: needs --data'),
    (['--calibrate', '-1'], '--calibrate -1'),
    (['--max-layer-prune', '0'], '--max-layer-prune 0.0'),
    (['--max-layer-prune', '1.5'], '--max-layer-prune 1.5'),
    (['--criterion', 'taylor'], 'pass --data with a train= list'),
    (['--round-to', '0'], '--round-to 0'),
])
def test_bad_selection_flags_are_refused(argv, words, small_weights, tmp_path):
    from utils.errors import UserInputError
    with pytest.raises(UserInputError, match=words.replace('-', r'\-').replace('.', r'\.')):
        _run(['--weights', small_weights] + argv, tmp_path / 'out')
    assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')


def test_default_run_writes_the_widths_plot_and_keeps_the_floor(small_weights, tmp_path):
    from pruning.criteria import get_criterion
    from pruning.settings import FALLBACK_CRITERION  # the default without training images
    DEFAULT_MAX_LAYER_PRUNE = get_criterion(FALLBACK_CRITERION).default_max_layer_prune
    result = _run(['--weights', small_weights, '--percent', '0.9', '--allow-capped'], tmp_path)
    with open(result['widths'], 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    plan = result['plan']
    for unit in plan.units:
        mask = plan.masks[unit[0]]
        assert int(mask.sum()) >= math.ceil((1 - DEFAULT_MAX_LAYER_PRUNE) * len(mask) - 1e-9)


@pytest.mark.parametrize('cfg,mode', [('small_detector.cfg', 'tiny'),
                                      ('residual_chain.cfg', 'shortcut'),
                                      ('residual_chain.cfg', 'regular')])
def test_default_criterion_writes_files_opencv_reads_as_the_keep_size_model(cfg, mode, tmp_path):
    """The default run (criterion, cost, floor): OpenCV's Darknet importer on the written
    compact files against our keep-size model of the same plan, on a fresh image."""
    from conftest import assert_same_detections, opencv_detections, our_detections

    from cli.prune import main
    from darknet.weights import save_weights
    cfg = os.path.join(TEST_CFGS, cfg)
    model = _model(cfg, seed=5)
    weights = str(tmp_path / 'model.weights')
    save_weights(model, weights)
    result = main(mode, ['--cfg', cfg, '--weights', weights, '--img-size', str(IMG),
                         '--percent', '0.5', '--output-dir', str(tmp_path / 'out')])
    keep_size, _ = prune(model, result['plan'])
    image = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(9)).numpy()
    written = Darknet(result['cfg'])
    assert_same_detections(our_detections(keep_size, image),
                           opencv_detections(result['cfg'], result['weights'], image, written),
                           opencv=True)
