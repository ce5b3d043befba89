"""The prune scripts end to end, through `cli.prune.main(mode, argv)`.

Each check compares two roads to one answer: a model whose doomed channels output a
constant (exactly 0 with gamma = beta = 0; act(beta) with gamma = 0 where the fold is
exact) against its pruned files, both read by OpenCV's Darknet importer; the compact
model against the keep-size model; the written files against the in-memory compact
model; the kept widths against a count made here from the gammas. Small cfgs run in
seconds; the shipped cfgs (at 64x64) are marked slow.
"""
import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (ROOT, TEST_CFGS, assert_same_detections, opencv_detections, our_detections,
                      randomize_weights)

from cli.prune import main
from darknet.cfg import parse_model_cfg
from darknet.model import Darknet
from darknet.weights import load_weights, save_weights
from pruning.graph import MODES, analyze_graph, prunable_convs
from pruning.surgery import output_difference, prune
from utils.errors import UserInputError

IMG = 64
FEATURES = os.path.join(TEST_CFGS, 'features.cfg')              # shortcut, SPP pools, groups
SMALL_DETECTOR = os.path.join(TEST_CFGS, 'small_detector.cfg')  # no shortcut: tiny mode
RESIDUAL_CHAIN = os.path.join(TEST_CFGS, 'residual_chain.cfg')  # two shortcut groups
PARTIAL_RESIDUAL = os.path.join(TEST_CFGS, 'partial_residual.cfg')  # sums of unequal widths
FULL_CFGS = [os.path.join(ROOT, 'cfg', name) for name in
             ('yolov3.cfg', 'yolov3-spp.cfg', 'yolov3-tiny.cfg', 'yolov4-tiny.cfg')]


def _modes(cfg):
    """The modes that apply to a cfg: all of them, but tiny only without shortcuts."""
    has_shortcut = analyze_graph(parse_model_cfg(cfg)[1]).has_shortcut
    return [mode for mode in MODES if not (mode == 'tiny' and has_shortcut)]


def _cases(cfgs):
    return [pytest.param(cfg, mode, id=f'{os.path.basename(cfg)}-{mode}')
            for cfg in cfgs for mode in _modes(cfg)]


SMALL_CASES = _cases([FEATURES, SMALL_DETECTOR, RESIDUAL_CHAIN, PARTIAL_RESIDUAL])
FULL_CASES = _cases(FULL_CFGS)


# ---------------------------------------------------------------- helpers

def _units(model, mode):
    """Convs that must share one mask: a prunable conv's whole shortcut group (from the
    graph analysis), else the conv alone."""
    info = analyze_graph(model.module_defs)
    prunable = prunable_convs(model.module_defs, mode, info=info)
    units = []
    for conv in prunable:
        unit = sorted(info.group_of(conv) or {conv})
        assert set(unit) <= set(prunable), f'{mode}: group {unit} only partly prunable'
        if unit not in units:
            units.append(unit)
    return units


def _gamma(model, conv):
    return model.module_list[conv].BatchNorm2d.weight.detach().abs()


def _sparsify(model, units, seed, kind, chosen=None, least=0.25):
    """Make a random share (`least` to 3/4, never none or all) of the channels of each
    chosen unit (default: all) prunable, the same channels in every conv of a unit (a
    narrower conv of a partial residual: those among its channels):
      'zero'      gamma = beta = 0: the channels output exactly 0;
      'constant'  gamma = 0, beta left random: they output exactly act(beta);
      'small'     |gamma| in [1e-4, 1e-2], any sign, beta left random.
    Returns {conv: bool mask of the doomed channels} over every conv of `units`."""
    rng = np.random.default_rng(seed)
    doomed = {}
    with torch.no_grad():
        for unit in units:
            width = max(model.module_list[conv].BatchNorm2d.num_features for conv in unit)
            mask = torch.zeros(width, dtype=torch.bool)
            if chosen is None or unit in chosen:
                count = int(rng.integers(max(1, math.ceil(least * width)),
                                         3 * width // 4 + 1))
                mask[torch.from_numpy(rng.choice(width, count, replace=False))] = True
            unit_mask = mask
            for conv in unit:
                bn = model.module_list[conv].BatchNorm2d
                mask = unit_mask[:bn.num_features]
                if kind == 'small':
                    count = int(mask.sum())
                    small = rng.uniform(1e-4, 1e-2, count) * rng.choice([-1, 1], count)
                    bn.weight[mask] = torch.from_numpy(small).float()
                else:
                    bn.weight[mask] = 0
                    if kind == 'zero':
                        bn.bias[mask] = 0
                doomed[conv] = mask
    return doomed


def _convs_read_only_by_1x1(layers):
    """Convs whose output reaches no conv with a kernel above 1x1 (through any pool,
    route, upsample or shortcut): a constant channel of theirs folds into its consumers
    exactly, borders included, since no zero padding of a kxk conv meets it."""
    info = analyze_graph(layers)
    read_by_kxk = set()
    for j, layer in enumerate(layers):
        if j and layer['type'] == 'convolutional' and layer.get('size', 1) > 1:
            read_by_kxk |= {conv for origin in info.origins[j - 1] for conv, _ in origin}
    return {i for i, layer in enumerate(layers) if layer['type'] == 'convolutional'} - read_by_kxk


def _percent_cutting(doomed, units):
    """A --percent whose global threshold falls exactly on the doomed channels: the
    threshold is the key ranked int(n * percent) among the n prunable channels (a
    shortcut group's channel counted once, its widest conv's), so aim between two ranks."""
    widest = [max(unit, key=lambda conv: len(doomed[conv])) for unit in units]
    count = sum(int(doomed[conv].sum()) for conv in widest)
    return (count + 0.5) / sum(len(doomed[conv]) for conv in widest)


def _least_share(mode):
    """Regular mode rounds kept widths up to a power of two: doom at least half of a
    layer's channels so that it still narrows."""
    return 0.5 if mode == 'regular' else 0.25


def _sparse_files(cfg, mode, folder, seed, kind):
    model = randomize_weights(Darknet(cfg), seed=seed).eval()
    doomed = _sparsify(model, _units(model, mode), seed, kind, least=_least_share(mode))
    weights = str(folder / 'sparse.weights')
    save_weights(model, weights)
    return model, doomed, weights


def _digest(*paths):
    return [hashlib.sha256(open(p, 'rb').read()).hexdigest() for p in paths]


def _run(mode, cfg, weights, out, *flags):
    """One prune run into `out`; the inputs must come out byte-identical, and `out` must
    hold exactly the pruned .cfg, .weights and widths plot. These tests choose what goes
    by setting gammas, so they run the gamma criterion without rounding unless the flags
    say otherwise (tests/test_criteria.py covers the other criteria and the defaults)."""
    before = _digest(cfg, weights)
    flags = [str(f) for f in flags]
    if '--criterion' not in flags:
        flags = ['--criterion', 'gamma'] + flags
    if '--round-to' not in flags and mode != 'regular':  # cut exactly the chosen channels
        flags = ['--round-to', '1'] + flags
    try:
        result = main(mode, ['--cfg', cfg, '--weights', weights, '--output-dir', str(out),
                             '--img-size', str(IMG), *flags])
    finally:
        assert _digest(cfg, weights) == before, 'an input file changed'
    assert os.path.dirname(result['cfg']) == os.path.dirname(result['weights']) == str(out)
    names = sorted(os.listdir(out))
    assert names == sorted(os.path.basename(result[k]) for k in ('cfg', 'weights', 'widths'))
    assert sorted(os.path.splitext(n)[1] for n in names) == ['.cfg', '.png', '.weights']
    return result


def _assert_nothing_written(out):
    assert not out.exists() or not os.listdir(out)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _image(seed=0):
    return np.random.default_rng(seed).random((1, 3, IMG, IMG), dtype=np.float32)






def _check_masks(plan, doomed, mode):
    """The plan cuts exactly the doomed channels (regular mode: may top some up) and
    touches no conv outside the mode's prunable set."""
    for conv, mask in plan.masks.items():
        if conv not in doomed:
            assert mask.all(), f'{mode}: conv {conv} is not prunable but lost channels'
        elif mode == 'regular':
            assert mask[~doomed[conv]].all(), f'conv {conv}: a live channel was cut'
        else:
            assert torch.equal(mask, ~doomed[conv]), f'conv {conv}: wrong channels cut'


def _check_written_widths(cfg, written_cfg, mode, round_to=None):
    """Only the filters of the mode's prunable convs change; regular widths are powers
    of two (8..1024) or multiples of round_to, or the layer's own width; every
    shortcut group of the original cfg keeps its convs' order of widths (one width
    where they were equal; a partial residual's narrower conv stays no wider)."""
    hyperparams, layers = parse_model_cfg(cfg)
    written_hyperparams, written = parse_model_cfg(written_cfg)
    assert written_hyperparams == hyperparams
    assert len(written) == len(layers)
    prunable = set(prunable_convs(layers, mode))
    for i, (old, new) in enumerate(zip(layers, written)):
        if i not in prunable:
            assert new == old, f'layer {i} changed'
            continue
        assert {k: v for k, v in new.items() if k != 'filters'} == {
            k: v for k, v in old.items() if k != 'filters'}
        width = new['filters']
        assert 1 <= width <= old['filters']
        if mode == 'regular' and width != old['filters']:
            if round_to:
                assert width % round_to == 0, f'layer {i}: {width} filters'
            else:
                assert width in [2 ** k for k in range(3, 11)], f'layer {i}: {width} filters'
    for group in analyze_graph(layers).shortcut_groups:
        for a in group:
            for b in group:
                if layers[a]['filters'] <= layers[b]['filters']:
                    assert written[a]['filters'] <= written[b]['filters'], (a, b)
                if layers[a]['filters'] == layers[b]['filters']:
                    assert written[a]['filters'] == written[b]['filters'], (a, b)
    return layers, written


# ---------------------------------------------------------------- (a) and (b): outputs

def _check_detections_unchanged(cfg, mode, folder, kind):
    """Prune channels that output a constant and compare detections before and after,
    as OpenCV reads the original and the pruned files, and as our model reads them.
    'zero' (a): gamma = beta = 0 in any prunable channel, which outputs exactly 0.
    'constant': gamma = 0, beta random, only in convs read by 1x1 convs alone, where
    folding act(beta) into the consumers' BN running_mean or conv bias is exact."""
    model = randomize_weights(Darknet(cfg), seed=11).eval()
    units = _units(model, mode)
    if kind == 'constant':
        exact = _convs_read_only_by_1x1(model.module_defs)
        chosen = [unit for unit in units if set(unit) <= exact]
        assert chosen, f'{cfg}: no {mode} unit folds exactly'
    else:
        chosen = units
    doomed = _sparsify(model, units, 11, kind, chosen, _least_share(mode))
    weights = str(folder / 'sparse.weights')
    save_weights(model, weights)
    result = _run(mode, cfg, weights, folder / 'out', '--percent',
                  _percent_cutting(doomed, units))
    _check_masks(result['plan'], doomed, mode)
    _check_written_widths(cfg, result['cfg'], mode)
    written = load_weights(Darknet(result['cfg']), result['weights']).eval()
    assert _params(written) < _params(model)
    assert result['after']['params'] == _params(written) < result['before']['params']

    image = _image()
    original = opencv_detections(cfg, weights, image, model)
    assert original[:, 4].std() > 0.02  # objectness varies: not a comparison of flat outputs
    pruned = opencv_detections(result['cfg'], result['weights'], image, written)
    assert_same_detections(pruned, original)
    assert_same_detections(our_detections(written, image), pruned, opencv=True)
    assert_same_detections(our_detections(written, image), our_detections(model, image))


def _check_compact_matches_keep_size(cfg, mode, folder):
    """(b) Pruned channels with nonzero betas: their constant act(beta) is folded into
    the consumers, so the compact model equals the keep-size one, and the written files
    reload to the in-memory compact model."""
    model, doomed, weights = _sparse_files(cfg, mode, folder, seed=12, kind='small')
    result = _run(mode, cfg, weights, folder / 'out', '--percent',
                  _percent_cutting(doomed, _units(model, mode)))
    _check_masks(result['plan'], doomed, mode)
    _check_written_widths(cfg, result['cfg'], mode)
    assert result['difference'] < 1e-5

    keep_size, compact = prune(load_weights(Darknet(cfg), weights).eval(), result['plan'])
    assert output_difference(keep_size, compact, IMG) < 1e-5
    assert output_difference(keep_size, compact, IMG, seed=1) < 1e-5
    written = load_weights(Darknet(result['cfg']), result['weights']).eval()
    assert _params(written) < _params(model)
    for (name, a), b in zip(compact.state_dict().items(), written.state_dict().values()):
        assert torch.equal(a, b), name
    assert output_difference(compact, written, IMG) < 1e-6


@pytest.mark.parametrize('cfg, mode', SMALL_CASES)
def test_zeroed_channels_are_removed_without_changing_detections(cfg, mode, tmp_path):
    _check_detections_unchanged(cfg, mode, tmp_path, 'zero')


@pytest.mark.parametrize('cfg, mode', SMALL_CASES)
def test_constant_channels_are_folded_exactly_into_1x1_consumers(cfg, mode, tmp_path):
    _check_detections_unchanged(cfg, mode, tmp_path, 'constant')


@pytest.mark.parametrize('cfg, mode', SMALL_CASES)
def test_compact_model_matches_keep_size_and_written_files(cfg, mode, tmp_path):
    _check_compact_matches_keep_size(cfg, mode, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('cfg, mode', FULL_CASES)
def test_full_cfg_zeroed_channels_are_removed_without_changing_detections(cfg, mode, tmp_path):
    _check_detections_unchanged(cfg, mode, tmp_path, 'zero')


@pytest.mark.slow
@pytest.mark.parametrize('cfg, mode', FULL_CASES)
def test_full_cfg_constant_channels_are_folded_exactly_into_1x1_consumers(cfg, mode, tmp_path):
    _check_detections_unchanged(cfg, mode, tmp_path, 'constant')


@pytest.mark.slow
@pytest.mark.parametrize('cfg, mode', FULL_CASES)
def test_full_cfg_compact_model_matches_keep_size_and_written_files(cfg, mode, tmp_path):
    _check_compact_matches_keep_size(cfg, mode, tmp_path)


# ---------------------------------------------------------------- (c) regular widths

@pytest.mark.parametrize('round_to', [None, 8])
def test_regular_widths_are_powers_of_two_or_multiples(round_to, tmp_path):
    model = randomize_weights(Darknet(RESIDUAL_CHAIN), seed=13)
    prunable = prunable_convs(model.module_defs, 'regular')
    weak = prunable[-1]  # every gamma tiny: it would keep nothing, and keeps its best 8
    generator = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for conv in prunable:  # about 60% small gammas, so most layers can narrow
            gamma = model.module_list[conv].BatchNorm2d.weight
            gamma[torch.rand(len(gamma), generator=generator) < 0.6] *= 0.01
        model.module_list[weak].BatchNorm2d.weight.mul_(0.01)
    weights = str(tmp_path / 'sparse.weights')
    save_weights(model, weights)
    flags = ['--percent', 0.7] + (['--round-to', round_to] if round_to else [])
    result = _run('regular', RESIDUAL_CHAIN, weights, tmp_path / 'out', *flags)
    layers, written = _check_written_widths(RESIDUAL_CHAIN, result['cfg'], 'regular', round_to)

    gammas = {i: _gamma(model, i) for i in prunable}
    ordered = sorted(torch.cat(list(gammas.values())).tolist())
    threshold = ordered[int(len(ordered) * 0.7) - 1]
    for i in prunable:
        above = int((gammas[i] > threshold).sum())
        if round_to:
            target = max(round_to, math.ceil(above / round_to) * round_to)
        else:
            target = 8
            while target < above:
                target *= 2
        assert written[i]['filters'] == min(target, layers[i]['filters']), i
        kept = result['plan'].masks[i]
        if not kept.all():  # top-ups take the largest gammas
            assert gammas[i][kept].min() > gammas[i][~kept].max()
    assert written[weak]['filters'] == 8
    assert sum(written[i]['filters'] < layers[i]['filters'] for i in prunable) >= 5
    assert result['difference'] < 1e-5


# ---------------------------------------------------------------- (d) shortcut groups

def test_shortcut_groups_keep_one_width_from_the_union_of_masks(tmp_path):
    model = randomize_weights(Darknet(RESIDUAL_CHAIN), seed=14)
    info = analyze_graph(model.module_defs)
    prunable = prunable_convs(model.module_defs, 'shortcut')
    assert set().union(*info.shortcut_groups) <= set(prunable)
    # a different random half of small gammas in every conv, tied ones included: a
    # group loses a channel only where all its convs have a small gamma
    generator = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for conv in prunable:
            gamma = model.module_list[conv].BatchNorm2d.weight
            gamma[torch.rand(len(gamma), generator=generator) < 0.5] *= 0.01
    weights = str(tmp_path / 'sparse.weights')
    save_weights(model, weights)
    result = _run('shortcut', RESIDUAL_CHAIN, weights, tmp_path / 'out', '--percent', 0.4)
    layers, written = _check_written_widths(RESIDUAL_CHAIN, result['cfg'], 'shortcut')

    gammas = {i: _gamma(model, i) for i in prunable}
    # --percent counts a group's channel once, keyed by its largest |gamma|
    keys = [torch.stack([gammas[c] for c in unit]).max(0).values
            for unit in _units(model, 'shortcut')]
    ordered = sorted(torch.cat(keys).tolist())
    threshold = ordered[int(len(ordered) * 0.4) - 1]
    for group in info.shortcut_groups:
        best = torch.stack([gammas[conv] for conv in group]).max(0).values
        widths = {written[conv]['filters'] for conv in group}
        assert widths == {int((best > threshold).sum())}, sorted(group)
        assert widths.pop() < layers[min(group)]['filters'], f'{sorted(group)} not pruned'
        # a channel kept by one branch only survives in every branch
        assert ((best > threshold) & (gammas[min(group)] <= threshold)).any()
    Darknet(result['cfg'])  # builds: each shortcut adds equal widths
    assert result['difference'] < 1e-5


# ---------------------------------------------------------------- (e) the percent limit

@pytest.mark.parametrize('cfg, mode', [(RESIDUAL_CHAIN, 'normal'), (RESIDUAL_CHAIN, 'shortcut'),
                                       (SMALL_DETECTOR, 'tiny')],
                         ids=['normal', 'shortcut', 'tiny'])
def test_percent_that_empties_a_layer_is_refused_unless_layer_keep(cfg, mode, tmp_path):
    model = randomize_weights(Darknet(cfg), seed=15)
    units = _units(model, mode)
    weak = max(units, key=len)  # a tied group in shortcut mode
    with torch.no_grad():
        for conv in weak:
            model.module_list[conv].BatchNorm2d.weight.mul_(0.01)
    weights = str(tmp_path / 'sparse.weights')
    save_weights(model, weights)

    # the largest count of smallest keys that can go with every unit keeping a channel;
    # a group's channel has one key, the largest |gamma| of its convs
    gammas = {conv: _gamma(model, conv) for unit in units for conv in unit}
    keys = [torch.stack([gammas[c] for c in unit]).max(0).values for unit in units]
    ordered = sorted(torch.cat(keys).tolist())
    total = len(ordered)

    def empties(count):
        return count > 0 and any(float(key.max()) <= ordered[count - 1] for key in keys)
    safe_count = max(count for count in range(total + 1) if not empties(count))
    assert 0 < safe_count < total // 2

    out = tmp_path / 'out'
    percent = (safe_count + 1.5) / total  # cuts one channel too many
    safe = f'{safe_count / total:.4f}'
    with pytest.raises(UserInputError, match=f'largest safe percent .* is {safe}'):
        _run(mode, cfg, weights, out, '--percent', percent)
    _assert_nothing_written(out)

    result = _run(mode, cfg, weights, out, '--percent', percent, '--layer-keep', 0.1)
    _, written = _check_written_widths(cfg, result['cfg'], mode)
    for unit in units:
        width = len(gammas[unit[0]])
        for conv in unit:
            assert written[conv]['filters'] >= max(1, math.ceil(0.1 * width)), conv
    best = torch.stack([gammas[conv] for conv in weak]).max(0).values
    kept = result['plan'].masks[weak[0]]
    assert int(kept.sum()) == math.ceil(0.1 * len(best))  # the floor, by largest gamma
    assert best[kept].min() > best[~kept].max()
    assert result['difference'] < 1e-5


def test_the_reported_safe_percent_itself_is_accepted(tmp_path):
    model = randomize_weights(Darknet(SMALL_DETECTOR), seed=21)
    convs = prunable_convs(model.module_defs, 'normal')
    with torch.no_grad():  # 16 tiny gammas: 15 of them can go, the 16th cannot
        model.module_list[convs[0]].BatchNorm2d.weight.mul_(0.01)
    weights = str(tmp_path / 'sparse.weights')
    save_weights(model, weights)
    total = sum(len(_gamma(model, conv)) for conv in convs)
    percent = 15 / total  # 15 / 240 = 0.0625, exact in binary
    result = _run('normal', SMALL_DETECTOR, weights, tmp_path / 'out', '--percent', percent)
    assert int(result['plan'].masks[convs[0]].sum()) == 1


# ---------------------------------------------------------------- files and refusals

@pytest.mark.parametrize('mode', MODES)
def test_output_is_one_cfg_and_one_weights_named_after_the_cfg_and_run(mode, tmp_path):
    weights = str(tmp_path / 'my-model.weights')
    save_weights(randomize_weights(Darknet(SMALL_DETECTOR), seed=16), weights)
    out = tmp_path / 'out'
    result = _run(mode, SMALL_DETECTOR, weights, out, '--percent', 0.3)
    name = f'small_detector-{mode}-0.3'  # <cfg stem>-<mode>-<percent>
    assert sorted(os.listdir(out)) == [f'{name}-widths.png', f'{name}.cfg', f'{name}.weights']
    assert result['cfg'] == str(out / f'{name}.cfg')
    assert result['weights'] == str(out / f'{name}.weights')


@pytest.mark.parametrize('percent', ['1.0', '-0.1'])
def test_percent_outside_zero_to_one_is_refused(percent, tmp_path):
    weights = str(tmp_path / 'model.weights')
    save_weights(randomize_weights(Darknet(SMALL_DETECTOR), seed=17), weights)
    out = tmp_path / 'out'
    with pytest.raises(UserInputError, match=f'--percent {float(percent)}: must be in'):
        _run('normal', SMALL_DETECTOR, weights, out, '--percent', percent)
    _assert_nothing_written(out)


def test_tiny_mode_refuses_a_cfg_with_shortcuts(tmp_path):
    weights = str(tmp_path / 'model.weights')
    save_weights(randomize_weights(Darknet(FEATURES), seed=18), weights)
    out = tmp_path / 'out'
    with pytest.raises(UserInputError, match='use prune_shortcut.py'):
        _run('tiny', FEATURES, weights, out, '--percent', 0.1)
    _assert_nothing_written(out)
    # the script itself: exit 2, one line, no traceback
    command = [sys.executable, os.path.join(ROOT, 'prune_tiny.py'), '--cfg', FEATURES,
               '--weights', weights, '--output-dir', str(out), '--img-size', str(IMG)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2, finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'prune_shortcut.py' in lines[0]
    _assert_nothing_written(out)


def test_cfg_without_prunable_convs_is_refused(tmp_path):
    """Every BN conv of route_groups2.cfg is sliced by a groups route (kept whole)."""
    cfg = os.path.join(TEST_CFGS, 'route_groups2.cfg')
    weights = str(tmp_path / 'model.weights')
    save_weights(randomize_weights(Darknet(cfg), seed=19), weights)
    out = tmp_path / 'out'
    with pytest.raises(UserInputError, match='no conv can be pruned in normal mode'):
        main('normal', ['--cfg', cfg, '--weights', weights, '--output-dir', str(out),
                        '--img-size', '32'])
    _assert_nothing_written(out)


@pytest.mark.parametrize('mode', ['normal', 'regular', 'shortcut'])
def test_pruned_files_can_be_pruned_again(mode, tmp_path):
    model, doomed, weights = _sparse_files(RESIDUAL_CHAIN, mode, tmp_path, seed=20, kind='small')
    first = _run(mode, RESIDUAL_CHAIN, weights, tmp_path / 'first',
                 '--percent', _percent_cutting(doomed, _units(model, mode)))
    # regular mode rounds widths up again: it needs a deeper cut to narrow a layer
    percent = 0.7 if mode == 'regular' else 0.3
    second = _run(mode, first['cfg'], first['weights'], tmp_path / 'second', '--percent', percent)
    stem = os.path.splitext(os.path.basename(first['weights']))[0]
    assert os.path.basename(second['cfg']) == f'{stem}-{mode}-{percent}.cfg'
    assert second['difference'] < 1e-5
    _check_written_widths(first['cfg'], second['cfg'], mode)
    sizes = [_params(load_weights(Darknet(r['cfg']), r['weights'])) for r in (first, second)]
    assert second['before']['params'] == sizes[0]
    assert sizes[1] < sizes[0] < first['before']['params']
