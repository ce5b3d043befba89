"""Bad input to the scripts: exit 2, one line naming the file and the fix, no traceback,
no new files, inputs byte-identical."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TEST_CFGS

from darknet.model import Darknet
from darknet.weights import save_weights

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')


def _digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), 'rb').read()).hexdigest()
            for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """Good and bad files side by side in one folder."""
    folder = tmp_path_factory.mktemp('inputs')
    model = Darknet(CFG)
    save_weights(model, str(folder / 'good.weights'))
    data = (folder / 'good.weights').read_bytes()
    (folder / 'truncated.weights').write_bytes(data[:len(data) // 2])
    (folder / 'text.weights').write_text('[net]\nwidth=64\n' * 20)
    torch.save({'model': Darknet(os.path.join(TEST_CFGS, 'features.cfg')).state_dict()},
               folder / 'other.pt')
    (folder / 'typo.cfg').write_text(open(CFG).read().replace('filters=16', 'filter=16'))
    (folder / 'images').mkdir()
    (folder / 'labels').mkdir()
    import cv2
    import numpy as np
    cv2.imwrite(str(folder / 'images' / 'a.png'), np.zeros((64, 64, 3), np.uint8))
    (folder / 'labels' / 'a.txt').write_text('7 0.5 0.5 0.2 0.2\n')
    (folder / 'list.txt').write_text('images/a.png\n')
    (folder / 'bad_class.data').write_text(f'classes=4\ntrain={folder}/list.txt\n'
                                           f'valid={folder}/list.txt\n')
    (folder / 'no_classes.data').write_text(f'train={folder}/list.txt\n')
    return folder


CASES = [
    ('train.py', ['--cfg', '{d}/missing.cfg'], 'missing.cfg: cfg file not found'),
    ('train.py', ['--cfg', '{d}/typo.cfg'], "no key 'filter'; did you mean 'filters'?"),
    ('train.py', ['--cfg', CFG, '--data', '{d}/bad_class.data', '--img-size', '64'],
     'labels/a.txt:1: class 7 is not below classes=4'),
    ('train.py', ['--cfg', CFG, '--data', '{d}/bad_class.data', '--img-size', '60'],
     '--img-size 60 is not a multiple of the model stride 8; use 56 or 64'),
    ('train.py', ['--cfg', CFG, '--data', '{d}/no_classes.data'], "no 'classes=' line"),
    ('test.py', ['--cfg', CFG, '--weights', '{d}/truncated.weights', '--data',
                 '{d}/bad_class.data'], 'truncated.weights: '),
    ('test.py', ['--cfg', CFG, '--weights', '{d}/text.weights', '--data',
                 '{d}/bad_class.data'], 'not a Darknet .weights file'),
    ('test.py', ['--cfg', CFG, '--weights', '{d}/other.pt', '--data', '{d}/bad_class.data'],
     'the checkpoint is for another cfg'),
    ('convert_weights.py', ['--cfg', CFG, '--weights', '{d}/good.weights', '--output',
                            '{d}/good.weights'], 'would overwrite an input file'),
    ('derive_cfg.py', ['--cfg', CFG, '--width', '-1', '--output', '{d}/new.cfg'],
     '--width -1.0: must be positive'),
]


@pytest.mark.parametrize('script, args, needle', CASES, ids=[f'{c[0]}:{c[2][:30]}' for c in CASES])
def test_bad_input_is_refused_cleanly(inputs, script, args, needle):
    before = _digest(inputs)
    command = [sys.executable, os.path.join(ROOT, script), '--workers', '0'] if script in (
        'train.py', 'test.py') else [sys.executable, os.path.join(ROOT, script)]
    command += [a.format(d=inputs) for a in args]
    if script == 'train.py':
        command += ['--output-dir', str(inputs / 'run')]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    assert needle in lines[0]
    assert 'Traceback' not in result.stderr + result.stdout
    assert _digest(inputs) == before
    run = inputs / 'run'
    assert not run.exists() or not os.listdir(run)
