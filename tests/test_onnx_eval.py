"""test.py --weights model.onnx: an exported file evaluated with onnxruntime.

Two roads to one mAP: the trained demo tiny model evaluated in PyTorch (test.py with
--cfg, its fused copy) and its ONNX export evaluated through onnxruntime (test.py with
--weights model.onnx), on a small freshly generated shapes set; they must agree within
0.005 mAP@0.5. The refusals: a raw-heads export, a wrong --img-size, no --data.
"""
import json
import os
import test as test_script

import numpy as np
import pytest
import torch
from conftest import ROOT

from darknet.model import Darknet
from darknet.weights import load_weights
from deploy.onnx_export import OnnxModel, export_onnx
from utils.errors import UserInputError

CFG = os.path.join(ROOT, 'cfg', 'yolov3-tiny-shapes.cfg')
WEIGHTS = os.path.join(ROOT, 'weights', 'yolov3-tiny-shapes.pt')
IMG = 128  # the demo model's size: its trained detections are what is scored

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason='demo weights not trained')]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """The demo tiny model and its export, decoded detections, fixed batch 1."""
    model = load_weights(Darknet(CFG), WEIGHTS).eval()
    path = str(tmp_path_factory.mktemp('onnx') / 'tiny.onnx')
    export_onnx(model, path, IMG)
    return model, path


def test_onnx_map_equals_pytorch_map(demo_shapes, exported, tmp_path):
    _, path = exported
    common = ['--data', demo_shapes, '--workers', '0', '--batch-size', '5']
    ours = test_script.main(['--cfg', CFG, '--weights', WEIGHTS] + common)
    metrics = str(tmp_path / 'onnx-metrics.json')
    theirs = test_script.main(['--weights', path, '--metrics-json', metrics] + common)
    assert ours.metrics['map50'] > 0.3  # a trained model: the comparison means something
    assert abs(theirs.metrics['map50'] - ours.metrics['map50']) <= 0.005
    assert abs(theirs.metrics['map50_95'] - ours.metrics['map50_95']) <= 0.005
    assert (theirs.images, theirs.targets) == (ours.images, ours.targets) == (24, ours.targets)
    assert json.load(open(metrics))['map50'] == theirs.metrics['map50']


def test_onnx_model_runs_each_image_of_a_batch(exported):
    """A batch-1 file is run image by image: a batch of 3 gives the model's 3 outputs."""
    model, path = exported
    x = torch.rand(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))
    wrapped = OnnxModel(path)
    assert (wrapped.img_size, wrapped.num_classes, wrapped.stride) == (IMG, 4, model.stride)
    with torch.no_grad():
        ours, theirs = model(x).numpy(), wrapped(x).numpy()
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()


def test_raw_heads_file_is_refused(exported, tmp_path, demo_shapes):
    model, _ = exported
    raw = str(tmp_path / 'raw.onnx')
    export_onnx(model, raw, IMG, raw_heads=True)
    with pytest.raises(UserInputError, match='without --raw-heads'):
        test_script.main(['--weights', raw, '--data', demo_shapes])


def test_wrong_img_size_and_missing_data_are_refused(exported, demo_shapes):
    _, path = exported
    with pytest.raises(UserInputError, match='exported for 128x128'):
        test_script.main(['--weights', path, '--data', demo_shapes, '--img-size', '160'])
    with pytest.raises(UserInputError, match='--data is required'):
        test_script.main(['--weights', path])
