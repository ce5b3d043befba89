"""What the scripts write and where: prune outputs named after the cfg and the run, no
silent overwrite of an earlier run's files (unless --exist-ok), export named after the
cfg, detect.py --compare --save-txt writing both models' labels, and test.py's table
showing the mAP@0.5:0.95 its --help promises."""
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

import detect
from cli.prune import main as prune_main
from darknet.model import Darknet
from darknet.weights import save_weights
from pruning.graph import prunable_convs
from utils.errors import UserInputError

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')  # 4 classes, 64 px


@pytest.fixture
def sparse(tmp_path):
    """A random-weight model with half of every prunable layer's gammas near zero."""
    model = randomize_weights(Darknet(CFG), seed=1)
    with torch.no_grad():
        for i in prunable_convs(model.module_defs, 'tiny'):
            model.module_list[i].BatchNorm2d.weight[::2] = 1e-3
    weights = str(tmp_path / 'best.weights')
    save_weights(model, weights)
    return weights


def _prune(weights, out, *flags):
    return prune_main('tiny', ['--cfg', CFG, '--weights', weights, '--percent', '0.25',
                               '--output-dir', str(out), *flags])


def _digests(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if name.endswith(('.cfg', '.weights'))}


def test_prune_outputs_are_named_after_the_cfg_and_never_replaced_unasked(sparse, tmp_path):
    out = tmp_path / 'out'
    first = _prune(sparse, out)
    assert os.path.basename(first['cfg']) == 'small_detector-tiny-0.25.cfg'
    assert os.path.basename(first['weights']) == 'small_detector-tiny-0.25.weights'
    before = _digests(out)
    with pytest.raises(UserInputError, match=r'small_detector-tiny-0\.25\.cfg \(and 1 more\): '
                                             'exists, from an earlier run; replace it with '
                                             '--exist-ok or choose another --output-dir'):
        _prune(sparse, out)
    assert _digests(out) == before
    again = _prune(sparse, out, '--exist-ok')
    assert again['cfg'] == first['cfg'] and _digests(out) == before  # same run, same bytes


def test_export_is_named_after_the_cfg_and_never_replaced_unasked(sparse, tmp_path):
    pytest.importorskip('onnxruntime')
    import export
    flags = ['--cfg', CFG, '--weights', sparse, '--output-dir', str(tmp_path / 'onnx')]
    result = export.main(flags)
    assert os.path.basename(result['path']) == 'small_detector.onnx'
    with pytest.raises(UserInputError, match='small_detector.onnx: exists, from an earlier run'):
        export.main(flags)
    assert export.main(flags + ['--exist-ok'])['path'] == result['path']


def _labels(folder):
    return {name: (folder / name).read_text() for name in sorted(os.listdir(folder))}


def test_compare_save_txt_writes_both_models_labels(sparse, tmp_path):
    """The --compare model's labels are the ones it writes when run alone."""
    pruned = _prune(sparse, tmp_path / 'pruned')
    images = tmp_path / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        cv2.imwrite(str(images / f'{k}.png'), rng.integers(0, 256, (48, 64, 3), np.uint8))
    common = ['--source', str(images), '--save-txt', '--conf-thres', '0.05']
    both = tmp_path / 'both'
    detect.main(['--cfg', CFG, '--weights', sparse, '--compare', pruned['cfg'],
                 pruned['weights'], '--output-dir', str(both), *common])
    alone = [tmp_path / 'first', tmp_path / 'second']
    detect.main(['--cfg', CFG, '--weights', sparse, '--output-dir', str(alone[0]), *common])
    detect.main(['--cfg', pruned['cfg'], '--weights', pruned['weights'], '--img-size', '64',
                 '--output-dir', str(alone[1]), *common])
    first, second = _labels(both / 'labels'), _labels(both / 'labels-compare')
    assert sorted(first) == sorted(second) == ['0.txt', '1.txt']
    assert first == _labels(alone[0] / 'labels')
    assert second == _labels(alone[1] / 'labels')
    assert any(first.values()) and any(second.values())  # boxes to compare


def test_test_table_shows_the_map_its_help_promises(capsys):
    import test as test_script
    assert 'mAP@0.5:0.95' in test_script.get_args_parser().description
    from evaluation.evaluate import Evaluation
    metrics = {'precision': 0.5, 'recall': 0.4, 'map50': 0.45, 'map50_95': 0.21, 'f1': 0.44}
    table = Evaluation(metrics, [(0, 3, 5, 0.5, 0.4, 0.45, 0.21, 0.44)], images=3,
                       targets=5).table(['a'])
    header, overall, row = [line for line in table.splitlines() if line.startswith('|')]
    columns = [cell.strip() for cell in header.split('|')[1:-1]]
    assert columns == ['Class', 'Images', 'Targets', 'P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1']
    assert [cell.strip() for cell in overall.split('|')[1:-1]][6] == '0.210'
    assert [cell.strip() for cell in row.split('|')[1:-1]][6] == '0.210'
