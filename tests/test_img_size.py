"""One image size from training to deployment: a .pt remembers the size it was trained
at, every script takes --img-size, else that size, else the cfg's width, and says which;
a pruned cfg carries the size it was pruned at; train.py warns about anchors made for
another input size."""
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from conftest import ROOT, TEST_CFGS

import derive_cfg
from cli import demo
from cli.common import anchor_size_warning, img_size_reason, trained_img_size, training_img_size
from darknet.cfg import parse_model_cfg, write_cfg
from darknet.model import Darknet
from darknet.weights import save_weights
from training.checkpoints import save_checkpoint

SMALL = os.path.join(TEST_CFGS, 'small_detector.cfg')  # width=64
TINY_COCO = os.path.join(ROOT, 'cfg', 'yolov3-tiny.cfg')  # width=416, anchors up to 344


@dataclass
class Settings:  # the part of training.engine.TrainSettings a checkpoint reads here
    img_size: Optional[int]


def _checkpoint(path, img_size):
    model = Darknet(SMALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(str(path), model, optimizer, 0, 0.0, Settings(img_size))
    return str(path)


def test_a_checkpoint_remembers_its_training_size(tmp_path):
    assert trained_img_size(_checkpoint(tmp_path / 'flag.pt', 96)) == 96
    # no --img-size: the run trained at the cfg's width, and the .pt says so
    assert trained_img_size(_checkpoint(tmp_path / 'cfg.pt', None)) == 64
    # a bare state dict, an older .pt with only its flags, a Darknet file, a broken file
    torch.save({'model': Darknet(SMALL).state_dict()}, tmp_path / 'bare.pt')
    torch.save({'model': {}, 'args': {'img_size': 160}}, tmp_path / 'old.pt')
    save_weights(Darknet(SMALL), str(tmp_path / 'm.weights'))
    (tmp_path / 'broken.pt').write_bytes(b'not a zip')
    assert trained_img_size(str(tmp_path / 'bare.pt')) is None
    assert trained_img_size(str(tmp_path / 'old.pt')) == 160
    assert trained_img_size(str(tmp_path / 'm.weights')) is None
    assert trained_img_size(str(tmp_path / 'broken.pt')) is None


def test_the_flag_then_the_checkpoint_then_the_cfg(tmp_path):
    pt = _checkpoint(tmp_path / 'best.pt', 96)
    assert img_size_reason(128, pt, 64, SMALL) == (128, '--img-size')
    size, why = img_size_reason(None, pt, 64, SMALL)
    assert size == 96 and why.startswith('from best.pt, the size it was trained at')
    assert "small_detector.cfg's width= is 64" in why
    save_weights(Darknet(SMALL), str(tmp_path / 'm.weights'))
    size, why = img_size_reason(None, str(tmp_path / 'm.weights'), 64, SMALL)
    assert size == 64 and why == 'the width= of small_detector.cfg; m.weights carries no ' \
                                 'training size'
    assert img_size_reason(None, None, None, SMALL)[0] == 416


def test_anchor_warning_follows_the_input_size():
    hyperparams, layers = parse_model_cfg(TINY_COCO)
    assert anchor_size_warning(hyperparams, layers, 416, TINY_COCO) is None
    line = anchor_size_warning(hyperparams, layers, 128, TINY_COCO)
    assert line.startswith('warning: yolov3-tiny.cfg: its largest anchor (344 px) is 2.69x')
    assert '(its width= is 416)' in line and '--img-size 128' in line
    # anchors far smaller than the input: made for a smaller one
    assert anchor_size_warning(hyperparams, layers, 4096, TINY_COCO) is not None
    for spec in (demo.YOLOV3, demo.TINY):
        cfg = os.path.join(ROOT, spec['cfg'])
        assert anchor_size_warning(*parse_model_cfg(cfg), demo.IMG_SIZE, cfg) is None


def test_derive_cfg_img_size_silences_the_warning(tmp_path):
    """The road docs/transfer.md gives: derive the cfg at the training size."""
    out = str(tmp_path / 'tiny128.cfg')
    derive_cfg.main(['--cfg', TINY_COCO, '--classes', '4', '--img-size', '128', '--output', out])
    hyperparams, layers = parse_model_cfg(out)
    assert hyperparams['width'] == hyperparams['height'] == 128
    assert anchor_size_warning(hyperparams, layers, 128, out) is None


def test_train_takes_the_size_of_the_checkpoint_it_starts_from(tmp_path, capsys):
    pt = _checkpoint(tmp_path / 'best.pt', 96)
    args = SimpleNamespace(cfg=SMALL, weights=pt, img_size=None, resume=False,
                           output_dir=str(tmp_path / 'run'))
    assert training_img_size(args) == 96 and args.img_size == 96
    assert capsys.readouterr().out.startswith('image size 96 (from best.pt')
    args = SimpleNamespace(cfg=TINY_COCO, weights=None, img_size=128, resume=False,
                           output_dir=str(tmp_path / 'run'))
    training_img_size(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'image size 128 (--img-size)' and lines[1].startswith('warning: ')


# ---------------------------------------------------------------- the scripts, end to end

def _run(script, *args):
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _printed_map(stdout, row):
    """(original, pruned) of a summary row, or test.py's 'all' mAP@0.5."""
    cells = re.search(r'\| ' + re.escape(row) + r' +\| ([\d.]+) +\| ([\d.]+)', stdout)
    return float(cells.group(1)), float(cells.group(2))


def test_the_trained_size_carries_through_prune_and_test(tmp_path, monkeypatch):
    """The issue's road: a cfg that says 416, a model trained at 128. Without --img-size,
    prune_tiny.py and test.py both take 128 (the .pt's size, then the pruned cfg's width)
    and print the same mAP for the same model."""
    hyperparams, layers = parse_model_cfg(os.path.join(ROOT, demo.TINY['cfg']))
    cfg = str(tmp_path / 'tiny-416.cfg')
    write_cfg(cfg, {**hyperparams, 'width': 416, 'height': 416}, layers)
    state = torch.load(os.path.join(ROOT, demo.TINY['weights']), map_location='cpu',
                       weights_only=True)['model']
    pt = str(tmp_path / 'best.pt')
    torch.save({'model': state, 'img_size': demo.IMG_SIZE}, pt)
    monkeypatch.chdir(ROOT)  # the demo data's paths are relative to the repository
    data = demo.ensure_demo_data()
    pruned = _run('prune_tiny.py', '--cfg', cfg, '--weights', pt, '--data', data,
                  '--criterion', 'lamp', '--calibrate', '0', '--workers', '0',
                  '--output-dir', tmp_path / 'out')
    assert pruned.splitlines()[0] == 'image size 128 (from best.pt, the size it was trained ' \
                                     "at; tiny-416.cfg's width= is 416, --img-size overrides)"
    before, after = _printed_map(pruned, 'mAP@0.5')
    assert before > 0.4  # at 416 the same model scores far lower
    tested = _run('test.py', '--cfg', cfg, '--weights', pt, '--data', data, '--workers', '0')
    assert tested.splitlines()[0].startswith('image size 128 (from best.pt')
    assert float(re.search(r'\| all +\| \d+ +\| \d+ +\| [\d.]+ +\| [\d.]+ +\| ([\d.]+)',
                           tested).group(1)) == pytest.approx(before, abs=1e-3)
    out_cfg, = (tmp_path / 'out').glob('*.cfg')
    assert parse_model_cfg(str(out_cfg))[0]['width'] == 128
    tested = _run('test.py', '--cfg', out_cfg, '--weights', out_cfg.with_suffix('.weights'),
                  '--data', data, '--workers', '0')
    assert tested.splitlines()[0].startswith('image size 128 (the width= of tiny-416-tiny-')
    assert float(re.search(r'\| all +\| \d+ +\| \d+ +\| [\d.]+ +\| [\d.]+ +\| ([\d.]+)',
                           tested).group(1)) == pytest.approx(after, abs=1e-3)


def test_export_and_detect_take_the_trained_size(tmp_path):
    pytest.importorskip('onnxruntime')
    import detect
    import export
    pt = _checkpoint(tmp_path / 'best.pt', 96)
    result = export.main(['--cfg', SMALL, '--weights', pt, '--output-dir', str(tmp_path)])
    assert result['img_size'] == 96
    from deploy.onnx_export import OnnxModel
    assert OnnxModel(result['path']).img_size == 96
    image = tmp_path / 'a.jpg'
    import cv2
    import numpy as np
    cv2.imwrite(str(image), np.full((50, 70, 3), 127, np.uint8))
    found = detect.main(['--cfg', SMALL, '--weights', pt, '--source', str(image),
                         '--output-dir', str(tmp_path / 'det')])
    assert [d.img_size for d in found['detectors']] == [96]
