"""Layer pruning (prune_layer.py, pruning/layer_prune.py): whole residual blocks removed.

The strongest check compares two roads to one output: a block whose branch is silenced
by its weights (last BN gamma = beta = 0, so the branch adds exactly 0) against the
files with that block deleted, read by our model and by OpenCV's Darknet importer. The
expected ranking comes from gammas set here by hand, the expected re-indexed cfg is
written out by hand, and depth + width in one run is compared with the two runs
(prune_layer.py, then prune_shortcut.py) it stands for. tests/cfgs/residual_blocks.cfg
has four removable blocks, two that are not, and routes and shortcuts naming removed
and kept layers by relative and absolute indices.
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (ROOT, TEST_CFGS, assert_same_detections, opencv_detections, our_detections,
                      randomize_weights)

from cli import prune as prune_cli
from darknet.cfg import parse_model_cfg
from darknet.model import Darknet
from darknet.weights import load_weights, save_weights
from prune_layer import get_args_parser, main
from pruning.layer_prune import (find_blocks, layer_prune, rank_blocks, remove_blocks,
                                 silenced_difference)
from pruning.surgery import output_difference, prune
from utils.errors import UserInputError

IMG = 64
CFG = os.path.join(TEST_CFGS, 'residual_blocks.cfg')
# shortcut layer -> (block input, why it cannot be removed), read off the cfg by hand
BLOCKS = {4: (1, None), 7: (4, None), 11: (8, None), 14: (11, 'its sum is leaky, not linear'),
          17: (14, None), 20: (17, 'layer 26 reads branch layer 18')}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


# ---------------------------------------------------------------- helpers

def _digest(*paths):
    return [hashlib.sha256(open(p, 'rb').read()).hexdigest() for p in paths]


def _run(cfg, weights, out, *flags):
    """One prune_layer run into `out`: inputs byte-identical, `out` holds exactly the
    written .cfg and .weights."""
    before = _digest(cfg, weights)
    try:
        result = main(['--cfg', cfg, '--weights', weights, '--output-dir', str(out),
                       '--img-size', str(IMG), *map(str, flags)])
    finally:
        assert _digest(cfg, weights) == before, 'an input file changed'
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p)
                                             for p in (result['cfg'], result['weights']))
    return result


def _assert_nothing_written(out):
    assert not out.exists() or not os.listdir(out)


def _set_gammas(model, values):
    """{conv: v}: every gamma of the conv +-v, signs alternating, so mean |gamma| = v."""
    with torch.no_grad():
        for conv, value in values.items():
            gamma = model.module_list[conv].BatchNorm2d.weight
            signs = torch.tensor([(-1.0) ** c for c in range(len(gamma))])
            gamma.copy_(value * signs)


def _silence(model, convs):
    """gamma = beta = 0 in each conv's BN: with an activation that maps 0 to 0 the conv
    outputs exactly zero, so a branch ending in it adds nothing to its shortcut."""
    with torch.no_grad():
        for conv in convs:
            assert model.module_defs[conv]['activation'] in ('leaky', 'swish', 'mish', 'relu')
            model.module_list[conv].BatchNorm2d.weight.zero_()
            model.module_list[conv].BatchNorm2d.bias.zero_()


def _files(model, folder, name='sparse'):
    weights = str(folder / f'{name}.weights')
    save_weights(model, weights)
    return weights


def _image(seed=0):
    return np.random.default_rng(seed).random((1, 3, IMG, IMG), dtype=np.float32)






def _check_against_opencv(cfg, weights, image):
    """Our model on the files against OpenCV's reading of them; returns ours."""
    model = load_weights(Darknet(cfg), weights).eval()
    ours = our_detections(model, image)
    assert_same_detections(ours, opencv_detections(cfg, weights, image, model), opencv=True)
    return ours


# ---------------------------------------------------------------- blocks and ranking

def test_blocks_and_what_keeps_them(tmp_path):
    blocks = find_blocks(Darknet(CFG))
    assert {b.shortcut: (b.source, b.obstacle) for b in blocks} == BLOCKS
    assert [b.index for b in blocks] == list(range(6))
    assert [b.layers for b in blocks][:2] == [[2, 3, 4], [5, 6, 7]]


def test_ranking_follows_the_weakest_conv_of_each_branch():
    model = randomize_weights(Darknet(CFG), seed=1)
    # (first conv, last conv) mean |gamma| per block; the weaker one is the score
    _set_gammas(model, {2: 0.3, 3: 0.05,     # A: 0.05
                        5: 0.02, 6: 0.9,     # B: 0.02
                        9: 0.5, 10: 0.4,     # C: 0.4
                        12: 0.001, 13: 0.001,  # D: weakest, but its sum is leaky
                        15: 0.1, 16: 0.2,    # E: 0.1
                        18: 0.001, 19: 0.001})  # F: a route reads its branch
    ranking = rank_blocks(model)
    assert [b.shortcut for b in ranking] == [7, 4, 17, 11]
    np.testing.assert_allclose([b.score for b in ranking], [0.02, 0.05, 0.1, 0.4], rtol=1e-6)


def test_remove_blocks_refuses_a_block_that_must_stay():
    model = Darknet(CFG)
    for layer in (14, 20, 5):  # leaky sum, branch read by a route, not a shortcut
        with pytest.raises(ValueError, match=f'layer {layer}: cannot remove'):
            remove_blocks(model, [layer])


# ---------------------------------------------------------------- the written files

def test_removes_exactly_the_chosen_blocks_and_reindexes_every_reference(tmp_path):
    model = randomize_weights(Darknet(CFG), seed=2).eval()
    _set_gammas(model, {2: 0.05, 5: 0.02})  # A and B, the chained pair, are the weakest
    weights = _files(model, tmp_path)
    result = _run(CFG, weights, tmp_path / 'out', '--layers', 2)
    assert [b.shortcut for b in result['removed']] == [4, 7]
    stem = os.path.splitext(os.path.basename(CFG))[0]  # outputs are named after the cfg
    assert os.path.basename(result['cfg']) == f'{stem}-layer-2.cfg'
    assert os.path.basename(result['weights']) == f'{stem}-layer-2.weights'

    hyperparams, layers = parse_model_cfg(CFG)
    written_hyperparams, written = parse_model_cfg(result['cfg'])
    assert written_hyperparams == hyperparams
    kept = [0, 1] + list(range(8, len(layers)))  # layers 2-7 are blocks A and B
    assert len(written) == len(kept)
    # new index -> references, worked out by hand: a removed shortcut stands for its
    # block input (7 -> 4 -> 1), relative references stay relative
    expected = {5: [2],        # shortcut 11: from=8, now layer 2
                8: [-3],       # shortcut 14: from=-3 (layer 11, now 5)
                11: [-3],      # shortcut 17: from=-3
                14: [11],      # shortcut 20: from=17, now 11
                18: [-7],      # route 24: -7, shortcut 17 (now 11)
                20: [-1, 12],  # route 26: -1, conv 18 (now 12)
                24: [-3],      # route 30: -3
                27: [-1, 1]}   # route 33: -1, shortcut 7 -> block input 1
    for new, old in enumerate(kept):
        key = {'route': 'layers', 'shortcut': 'from'}.get(layers[old]['type'])
        if key:
            assert written[new][key] == expected.pop(new), f'layer {new} (was {old})'
        assert {k: v for k, v in written[new].items() if k != key} == \
            {k: v for k, v in layers[old].items() if k != key}, f'layer {new} (was {old})'
    assert not expected

    pruned = load_weights(Darknet(result['cfg']), result['weights'])
    for new, old in enumerate(kept):
        if layers[old]['type'] == 'convolutional':
            ours, theirs = pruned.module_list[new].state_dict(), model.module_list[old].state_dict()
            for name in theirs:
                assert torch.equal(ours[name], theirs[name]), f'layer {new} (was {old}) {name}'
    _check_against_opencv(result['cfg'], result['weights'], _image())


def test_zeroed_branches_are_removed_without_changing_detections(tmp_path):
    model = randomize_weights(Darknet(CFG), seed=3).eval()
    _silence(model, [6, 10, 16])  # the last convs of B, C (a swish end) and E
    weights = _files(model, tmp_path)
    result = _run(CFG, weights, tmp_path / 'out', '--layers', 3, '--verbose')
    assert [b.shortcut for b in result['removed']] == [7, 11, 17]
    assert [b.score for b in result['ranking'][:3]] == [0, 0, 0]
    assert result['depth_difference'] < 1e-6
    assert result['after']['params'] < result['before']['params']

    image = _image()
    original = _check_against_opencv(CFG, weights, image)
    assert original[:, 4].std() > 0.02  # objectness varies: not flat outputs
    pruned = _check_against_opencv(result['cfg'], result['weights'], image)
    assert_same_detections(pruned, original)
    assert_same_detections(opencv_detections(result['cfg'], result['weights'], image, model),
                            opencv_detections(CFG, weights, image, model))


def test_zeroed_branches_of_the_demo_yolov3_cfg(tmp_path):
    """The shipped YOLOv3 layout, routes to shortcuts 36 and 61 included: removing the
    blocks those routes read points them at the block inputs."""
    cfg = os.path.join(ROOT, 'cfg', 'yolov3-shapes.cfg')
    model = randomize_weights(Darknet(cfg), seed=4).eval()
    chosen = [4, 36, 58, 61]
    assert all(b.removable for b in find_blocks(model) if b.shortcut in chosen)
    _silence(model, [s - 1 for s in chosen])
    weights = _files(model, tmp_path)
    result = _run(cfg, weights, tmp_path / 'out', '--layers', 4)
    assert [b.shortcut for b in result['removed']] == chosen
    assert len(parse_model_cfg(result['cfg'])[1]) == len(model.module_defs) - 12
    image = _image()
    pruned = _check_against_opencv(result['cfg'], result['weights'], image)
    assert_same_detections(pruned, our_detections(model, image))


def test_self_check_sees_a_wrong_removal():
    model = randomize_weights(Darknet(CFG), seed=5).eval()
    blocks = {b.shortcut: b for b in find_blocks(model)}
    right = remove_blocks(model, [7])
    assert silenced_difference(model, right, [blocks[7]], IMG) < 1e-6
    # silencing a block other than the removed one: the outputs must be seen to differ
    assert silenced_difference(model, right, [blocks[4]], IMG) > 1e-2


# ---------------------------------------------------------------- depth and width

def test_depth_and_width_in_one_pass_equal_the_two_runs(tmp_path):
    model = randomize_weights(Darknet(CFG), seed=6).eval()
    _silence(model, [3, 16])  # A and E go
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():  # about 40% small gammas everywhere: channels to cut
        for i, layer in enumerate(model.module_defs):
            if layer.get('batch_normalize', 0) and i not in (3, 16):
                gamma = model.module_list[i].BatchNorm2d.weight
                gamma[torch.rand(len(gamma), generator=generator) < 0.4] *= 0.01
    weights = _files(model, tmp_path)
    one = _run(CFG, weights, tmp_path / 'one', '--layers', 2, '--percent', 0.3, '--verbose')
    assert [b.shortcut for b in one['removed']] == [4, 17]
    assert os.path.basename(one['cfg']) == 'residual_blocks-layer-2-0.3.cfg'  # the cfg's name
    assert one['depth_difference'] < 1e-6 and one['difference'] < 1e-5

    depth = _run(CFG, weights, tmp_path / 'depth', '--layers', 2)
    width = prune_cli.main('shortcut', ['--cfg', depth['cfg'], '--weights', depth['weights'],
                                        '--output-dir', str(tmp_path / 'width'),
                                        '--img-size', str(IMG), '--percent', '0.3',
                                        '--criterion', 'gamma', '--round-to', '1'])  # prune_layer's rule
    assert _digest(one['cfg'], one['weights']) == _digest(width['cfg'], width['weights'])

    # the channel step's self-check, redone here on two images
    keep_size, compact = prune(one['result'].depth_model, one['plan'])
    assert output_difference(keep_size, compact, IMG) < 1e-5
    assert output_difference(keep_size, compact, IMG, seed=1) < 1e-5
    written = parse_model_cfg(one['cfg'])[1]
    depth_layers = parse_model_cfg(depth['cfg'])[1]
    narrower = [i for i, layer in enumerate(written) if layer['type'] == 'convolutional'
                and layer['filters'] < depth_layers[i]['filters']]
    assert len(narrower) >= 5
    assert one['after']['params'] < depth['after']['params'] < one['before']['params']
    _check_against_opencv(one['cfg'], one['weights'], _image())


def test_layer_prune_leaves_its_input_alone():
    model = randomize_weights(Darknet(CFG), seed=7).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = layer_prune(model, 2, percent=0.2)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(result.removed) == 2 and result.compact is not result.depth_model
    assert result.ranking[:2] == sorted(result.removed, key=lambda b: b.score)


# ---------------------------------------------------------------- flags and refusals

def test_default_layers_is_a_quarter_of_the_removable_blocks(tmp_path):
    weights = _files(randomize_weights(Darknet(CFG), seed=8), tmp_path, 'my-model')
    result = _run(CFG, weights, tmp_path / 'out')
    assert len(result['removed']) == 1  # 4 removable blocks
    assert sorted(os.listdir(tmp_path / 'out')) == ['residual_blocks-layer-1.cfg',
                                                   'residual_blocks-layer-1.weights']


def test_common_flags_match_the_channel_prune_scripts():
    ours = {a.dest: (a.default, a.type) for a in get_args_parser()._actions}
    theirs = {a.dest: (a.default, a.type) for a in prune_cli.get_args_parser('shortcut')._actions}
    common = ['cfg', 'weights', 'data', 'img_size', 'batch_size', 'device', 'workers',
              'output_dir', 'layer_keep', 'verbose']
    assert [ours.get(k) for k in common] == [theirs.get(k, 'missing') for k in common]
    assert ours['percent'] == (None, float)  # channel pruning is optional here


@pytest.mark.parametrize('cfg, flags, message', [
    (CFG, ['--layers', 5], ('--layers 5: .*residual_blocks.cfg has 4 removable residual '
                            r'blocks \(2 of its 6 .* e.g. layer 14: its sum is leaky.*\); '
                            'pass --layers 4 or fewer')),
    (CFG, ['--layers', 0], '--layers 0: must be at least 1'),
    (CFG, ['--layer-keep', 0.1], '--layer-keep applies to channel pruning: pass --percent'),
    (CFG, ['--layers', 1, '--percent', 1], '--percent 1.0: must be in'),
    (os.path.join(TEST_CFGS, 'small_detector.cfg'), [], 'has no \\[shortcut\\] layer'),
    (os.path.join(TEST_CFGS, 'features.cfg'), [],
     'none of its 1 \\[shortcut\\] blocks can be removed .*leaky'),
], ids=['too-many', 'zero', 'layer-keep-alone', 'percent', 'no-shortcut', 'none-removable'])
def test_refusals_write_nothing(cfg, flags, message, tmp_path):
    weights = _files(randomize_weights(Darknet(cfg), seed=9), tmp_path)
    out = tmp_path / 'out'
    with pytest.raises(UserInputError, match=message):
        _run(cfg, weights, out, *flags)
    _assert_nothing_written(out)


@pytest.mark.parametrize('cfg, flags, words', [
    (CFG, ['--layers', '7'], ['has 4 removable residual blocks', '--layers 4 or fewer']),
    (os.path.join(TEST_CFGS, 'small_detector.cfg'), [], ['small_detector.cfg',
                                                        'no [shortcut] layer']),
], ids=['too-many', 'no-shortcut'])
def test_script_refusals_are_one_line_exit_2(cfg, flags, words, tmp_path):
    weights = _files(randomize_weights(Darknet(cfg), seed=10), tmp_path)
    out = tmp_path / 'out'
    command = [sys.executable, os.path.join(ROOT, 'prune_layer.py'), '--cfg', cfg,
               '--weights', weights, '--output-dir', str(out), '--img-size', str(IMG), *flags]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert finished.returncode == 2, finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), finished.stderr
    assert all(word in lines[0] for word in words), lines[0]
    _assert_nothing_written(out)


def test_help():
    finished = subprocess.run([sys.executable, os.path.join(ROOT, 'prune_layer.py'), '--help'],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert finished.returncode == 0, finished.stderr
    for flag in ('--layers', '--percent', '--layer-keep', '--cfg', '--output-dir'):
        assert flag in finished.stdout
