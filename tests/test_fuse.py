"""Darknet.fuse(): BatchNorm folded into each conv, for inference.

Two roads: the fused copy against the model it came from (every shipped cfg, pruned
and not, decoded detections and raw heads), and the fused copy written as a BN-free
cfg + .weights read by OpenCV's Darknet importer against the unfused model. The model
that was fused must come back untouched. The full-size cfgs (62M parameters) are slow.
"""
import copy
import os

import numpy as np
import pytest
import torch
from conftest import (SHIPPED_CFGS, TEST_CFGS, assert_same_detections, opencv_detections,
                      our_detections, randomize_weights)

from darknet.cfg import write_cfg
from darknet.model import Darknet
from darknet.weights import load_weights, save_weights
from pruning.graph import analyze_graph
from pruning.plan import plan_masks
from pruning.surgery import prune

IMG = 64
FULL = {'yolov3.cfg', 'yolov3-spp.cfg'}

pytestmark = pytest.mark.usefixtures('one_thread')


def _model(cfg, pruned):
    """Random weights with BN statistics far from (0, 1), so a wrong fold shows; pruned:
    the compact model of a 40% cut (shortcut mode where the cfg has shortcuts)."""
    model = randomize_weights(Darknet(cfg), seed=3).eval()
    if pruned:
        mode = 'shortcut' if analyze_graph(model.module_defs).has_shortcut else 'tiny'
        _, model = prune(model, plan_masks(model, mode, 0.4, layer_keep=0.05))
    return model.eval()


CASES = [pytest.param(cfg, pruned, id=os.path.basename(cfg)[:-4] + ('-pruned' if pruned else ''),
                      marks=[pytest.mark.slow] if os.path.basename(cfg) in FULL else [])
         for cfg in SHIPPED_CFGS for pruned in (False, True)]


@pytest.mark.parametrize('cfg, pruned', CASES)
def test_fused_model_gives_the_same_outputs(cfg, pruned):
    model = _model(cfg, pruned)
    fused = model.fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    convs = sum(layer['type'] == 'convolutional' for layer in model.module_defs)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.bias is not None
               for m in fused.modules()) == convs
    x = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(model(x, raw=True), fused(x, raw=True)):
            assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max()))
        ours, theirs = model(x), fused(x)
    for i in range(len(x)):
        assert_same_detections(ours[i].double().numpy(), theirs[i].double().numpy())


def test_fusing_leaves_the_model_untouched():
    model = randomize_weights(Darknet(os.path.join(TEST_CFGS, 'small_detector.cfg'))).train()
    state = copy.deepcopy(model.state_dict())
    layers = copy.deepcopy(model.module_defs)
    fused = model.fuse()
    assert model.training and not fused.training
    assert model.module_defs == layers
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # the copy shares no tensor with the model: a training step cannot reach it
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in fused.parameters()}


def test_fused_weights_read_by_opencv_match_the_unfused_model(tmp_path):
    """The fused copy saves as a BN-free Darknet model; OpenCV's reader of that cfg +
    .weights (its own conv code) gives the unfused model's detections."""
    cfg = os.path.join(TEST_CFGS, 'small_detector.cfg')
    model = randomize_weights(Darknet(cfg), seed=5).eval()
    fused = model.fuse()
    fused_cfg, fused_weights = str(tmp_path / 'fused.cfg'), str(tmp_path / 'fused.weights')
    write_cfg(fused_cfg, fused.hyperparams, fused.module_defs)
    save_weights(fused, fused_weights)
    assert os.path.getsize(fused_weights) < os.path.getsize(_saved(model, tmp_path))
    image = np.random.default_rng(2).random((1, 3, IMG, IMG), np.float32)
    theirs = opencv_detections(fused_cfg, fused_weights, image, model)
    assert_same_detections(our_detections(model, image), theirs, opencv=True)
    # and our own reader of the fused files agrees with the fused model in memory
    reread = load_weights(Darknet(fused_cfg), fused_weights).eval()
    assert_same_detections(our_detections(reread, image), our_detections(fused, image))


def _saved(model, folder):
    path = str(folder / 'original.weights')
    save_weights(model, path)
    return path


def test_latency_helpers_time_the_deployed_forms(monkeypatch):
    """fused_latency times the fused copy and leaves the model as it was; model_latency
    says None, not an error, where onnxruntime is missing (the prune summary's case)."""
    from deploy import onnx_export as onnx_utils
    from utils import torch_utils
    from utils.errors import UserInputError
    model = randomize_weights(Darknet(os.path.join(TEST_CFGS, 'small_detector.cfg'))).train()
    timed = []
    monkeypatch.setattr(torch_utils, 'measure_latency',
                        lambda m, img_size, **kw: timed.append((m, img_size, kw)) or 0.5)
    assert torch_utils.fused_latency(model, IMG, min_runs=2) == 0.5
    (subject, size, kwargs), = timed
    assert subject is not model and (size, kwargs) == (IMG, {'min_runs': 2})
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in subject.modules())
    assert model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert onnx_utils.model_latency(model.eval(), IMG, runs=1) > 0

    def missing():
        raise UserInputError('the ONNX export needs the optional package onnxruntime')
    monkeypatch.setattr(onnx_utils, 'require_onnx', missing)
    assert onnx_utils.model_latency(model, IMG) is None
