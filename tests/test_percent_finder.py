"""--target-params / --target-gmacs: the percent finder against real compact models.

The finder predicts costs from shapes on the meta device; each check builds the real
compact model with `prune` and counts it, so the prediction and the search are checked
against the thing the user gets.
"""
import os

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from cli.prune import main
from darknet.model import Darknet
from darknet.weights import load_weights
from pruning.plan import compact_cost, find_percent, plan_masks
from pruning.surgery import prune
from utils.errors import UserInputError
from utils.torch_utils import count_macs, count_parameters

IMG = 64
CASES = [('features.cfg', 'normal'), ('features.cfg', 'shortcut'), ('features.cfg', 'regular'),
         ('residual_chain.cfg', 'shortcut'), ('small_detector.cfg', 'tiny')]


def _model(name, seed=0):
    return randomize_weights(Darknet(os.path.join(TEST_CFGS, name)), seed).eval()


def _removed(model, plan, measure):
    """Share of the parameters or MACs the real compact model of `plan` removes."""
    compact = prune(model, plan)[1]
    if measure == 'params':
        return 1 - count_parameters(compact) / count_parameters(model)
    return 1 - count_macs(compact, IMG) / count_macs(model, IMG)


@pytest.mark.parametrize('name,mode', CASES)
def test_compact_cost_matches_the_built_compact_model(name, mode):
    model = _model(name)
    plan = plan_masks(model, mode, 0.4, layer_keep=0.1)
    compact = prune(model, plan)[1]
    assert compact_cost(model, plan.masks, IMG) == (count_parameters(compact),
                                                     count_macs(compact, IMG))


@pytest.mark.parametrize('measure', ['params', 'gmacs'])
@pytest.mark.parametrize('name,mode', CASES)
def test_found_percent_is_the_smallest_that_reaches_the_target(name, mode, measure):
    model = _model(name)
    target = 0.2  # regular mode on features.cfg reaches only 27% of the MACs
    percent, plan, share = find_percent(model, mode, target, measure, IMG, layer_keep=0.05)
    assert plan.percent == pytest.approx(percent)
    assert _removed(model, plan, measure) == pytest.approx(share)
    assert share >= target
    # one step less misses the target (or prunes nothing at all)
    if percent > 1e-4:
        smaller = plan_masks(model, mode, percent - 1e-4, layer_keep=0.05)
        assert _removed(model, smaller, measure) < target


def test_unreachable_target_is_refused_with_the_reachable_share():
    model = _model('residual_chain.cfg')
    with pytest.raises(UserInputError, match=r'removes at most .*%.*largest safe percent'):
        find_percent(model, 'shortcut', 0.99, 'params', IMG)


def test_cli_target_params_writes_a_model_that_reaches_it(tmp_path, capsys):
    model = _model('features.cfg', seed=3)
    weights = tmp_path / 'sparse.pt'
    torch.save({'model': model.state_dict()}, weights)
    result = main('normal', ['--cfg', os.path.join(TEST_CFGS, 'features.cfg'), '--weights',
                             str(weights), '--img-size', str(IMG), '--target-params', '0.25',
                             '--layer-keep', '0.05', '--output-dir', str(tmp_path / 'out')])
    written = load_weights(Darknet(result['cfg']), result['weights'])
    assert 1 - count_parameters(written) / count_parameters(model) >= 0.25
    assert f'-normal-{result["plan"].percent:g}.cfg' in result['cfg']
    assert '--target-params 0.25: --percent' in capsys.readouterr().out


def test_cli_refuses_percent_with_a_target(tmp_path):
    weights = tmp_path / 'sparse.pt'
    torch.save({'model': _model('features.cfg').state_dict()}, weights)
    with pytest.raises(UserInputError, match='pass one of them'):
        main('normal', ['--cfg', os.path.join(TEST_CFGS, 'features.cfg'), '--weights',
                        str(weights), '--percent', '0.3', '--target-gmacs', '0.2',
                        '--output-dir', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
