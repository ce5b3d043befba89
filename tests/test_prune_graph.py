"""Graph analysis: the sets each mode prunes, checked against obvious per-cfg readings."""
import os

import pytest
import torch
from conftest import TEST_CFGS

from darknet.cfg import parse_model_cfg
from darknet.layers import resolve_refs
from pruning.graph import analyze_graph, prunable_convs
from training.sparsity import add_sparsity_gradient, sparsity_report
from utils.errors import UserInputError

ROOT = os.path.dirname(TEST_CFGS)


def _layers(name):
    path = name if os.path.isabs(name) else os.path.join(ROOT, '..', 'cfg', name)
    return parse_model_cfg(path)[1]


def _obvious_shortcut_groups(layers):
    """Reading of plain residual chains: a shortcut ties the conv before it with its
    `from` layer, which is a conv or an earlier shortcut (and so that one's group)."""
    group_of = {}
    for i, layer in enumerate(layers):
        if layer['type'] != 'shortcut':
            continue
        target = resolve_refs(i, layer['from'])[0]
        group = group_of.get(target, {target})
        group |= {i - 1, i}
        for member in group:
            group_of[member] = group
    return {frozenset(m for m in g if layers[m]['type'] == 'convolutional')
            for g in group_of.values()}


def _obvious_upsample_feeders(layers):
    return {i - 1 for i, layer in enumerate(layers) if layer['type'] == 'upsample'}


def _bn_convs(layers):
    return [i for i, layer in enumerate(layers)
            if layer['type'] == 'convolutional' and layer.get('batch_normalize', 0)]


@pytest.mark.parametrize('name', ['yolov3.cfg', 'yolov3-spp.cfg'])
def test_yolov3_sets_match_the_obvious_reading(name):
    layers = _layers(name)
    info = analyze_graph(layers)
    groups = _obvious_shortcut_groups(layers)
    assert {frozenset(g) for g in info.shortcut_groups} == groups
    assert sorted(len(g) for g in groups) == [2, 3, 5, 9, 9]  # the five Darknet-53 stages
    assert info.upsample_feeders == _obvious_upsample_feeders(layers)
    tied = set().union(*groups)
    assert prunable_convs(layers, 'normal') == [
        i for i in _bn_convs(layers) if i not in tied | info.upsample_feeders]
    assert prunable_convs(layers, 'regular') == prunable_convs(layers, 'normal')
    assert prunable_convs(layers, 'shortcut') == [
        i for i in _bn_convs(layers) if i not in info.upsample_feeders]
    with pytest.raises(UserInputError, match='use prune_shortcut.py'):
        prunable_convs(layers, 'tiny')


def test_yolov3_counts():
    layers = _layers('yolov3.cfg')
    assert len(_bn_convs(layers)) == 72
    assert len(prunable_convs(layers, 'normal')) == 72 - 28 - 2
    assert len(prunable_convs(layers, 'shortcut')) == 72 - 2


def test_tiny_models():
    layers = _layers('yolov3-tiny.cfg')
    assert prunable_convs(layers, 'tiny') == [
        i for i in _bn_convs(layers) if i not in _obvious_upsample_feeders(layers)]
    v4 = _layers('yolov4-tiny.cfg')
    info = analyze_graph(v4)
    sliced = {resolve_refs(i, layer['layers'])[0] for i, layer in enumerate(v4)
              if layer['type'] == 'route' and layer.get('groups', 1) > 1}
    assert info.sliced_convs == sliced and len(sliced) == 3
    assert set(prunable_convs(v4, 'tiny')) == set(_bn_convs(v4)) - sliced - info.upsample_feeders


def test_origins_follow_routes_groups_and_sums():
    layers = _layers(os.path.join(TEST_CFGS, 'features.cfg'))
    info = analyze_graph(layers)
    # layer 4 sums conv 1 and conv 3 channel by channel
    assert info.origins[4][5] == {(1, 5), (3, 5)}
    # layer 6 takes the second half of grouped conv 5's 24 channels
    assert info.origins[6] == [frozenset({(5, c)}) for c in range(12, 24)]
    # the SPP route concatenates three maxpools of conv 10, then conv 10 itself
    assert [next(iter(o))[1] for o in info.origins[14]] == list(range(32)) * 3
    assert info.upsample_feeders == {19}


def test_sparsity_report_matches_a_brute_force_search():
    from darknet.model import Darknet
    model = Darknet(os.path.join(TEST_CFGS, 'small_detector.cfg'))
    convs = prunable_convs(model.module_defs, 'tiny')
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for j, i in enumerate(convs):  # layer j's gammas reach at most 0.1 * (j + 1)
            bn = model.module_list[i].BatchNorm2d
            bn.weight.copy_(torch.rand(bn.num_features, generator=generator) * 0.1 * (j + 1))
    gammas = [(i, g) for i in convs
              for g in model.module_list[i].BatchNorm2d.weight.abs().tolist()]
    ordered = sorted(gammas, key=lambda pair: pair[1])
    safe = 0  # cut the k smallest while every layer keeps a channel
    while safe < len(ordered) and {i for i, _ in ordered[safe + 1:]} == set(convs):
        safe += 1
    report = sparsity_report(model, 'tiny')
    assert report['channels'] == len(gammas)
    assert report['max_safe_percent'] == pytest.approx(safe / len(gammas))
    assert report['share_small'] == pytest.approx(sum(g < 0.01 for _, g in gammas) / len(gammas))


def test_sparsity_gradient_is_s_times_sign():
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.001, -0.5, 0.2]))
    bn.weight.grad = torch.zeros(3)
    add_sparsity_gradient([bn], 0.01)
    assert torch.equal(bn.weight.grad, torch.tensor([0.01, -0.01, 0.01]))
