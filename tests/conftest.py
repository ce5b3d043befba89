"""Shared helpers: random weights, OpenCV's Darknet reader, the repo on sys.path."""
import glob
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEST_CFGS = os.path.join(ROOT, 'tests', 'cfgs')
SHIPPED_CFGS = sorted(glob.glob(os.path.join(ROOT, 'cfg', '*.cfg')))


def randomize_weights(model, seed=0):
    """Weights and BN statistics drawn so every head's raw outputs span about +-3."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                uniform = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)
                module.weight.copy_(uniform(0.5, 1.5))
                module.bias.copy_(uniform(-0.5, 0.5))
                module.running_mean.copy_(uniform(-0.5, 0.5))
                module.running_var.copy_(uniform(0.5, 2.0))
    return model


def opencv_detections(cfg_path, weights_path, image, model):
    """OpenCV's Darknet importer on `image` (1, C, H, W), rows reordered like our model's.

    OpenCV gives each head as (row, col, anchor) rows with boxes scaled to [0, 1] and
    class scores multiplied by objectness; ours are (anchor, row, col) in pixels.
    """
    import cv2
    net = cv2.dnn.readNetFromDarknet(cfg_path, weights_path)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(image)
    outputs = net.forward(net.getUnconnectedOutLayersNames())
    height, width = image.shape[2:]
    heads = []
    # OpenCV names its outputs by layer; sort them back into cfg order by size of grid
    for out, layer in zip(outputs, model.yolo_layers):
        a = layer.num_anchors
        stride = height * width * a // out.shape[0]
        grid_h, grid_w = height // int(stride ** 0.5), width // int(stride ** 0.5)
        rows = out.reshape(grid_h, grid_w, a, -1).transpose(2, 0, 1, 3).reshape(out.shape[0], -1)
        rows = rows.astype(np.float64)
        rows[:, [0, 2]] *= width
        rows[:, [1, 3]] *= height
        heads.append(rows)
    return np.concatenate(heads)


def our_detections(model, image):
    """Our model's eval output on `image` (1, C, H, W numpy), as float64 rows."""
    with torch.no_grad():
        return model.eval()(torch.from_numpy(image))[0].double().numpy()


def assert_same_detections(ours, theirs, opencv=False):
    """xy within 0.01 px, log wh within 1e-3, probabilities within 1e-4. opencv: `theirs`
    is OpenCV's, whose class columns are objectness * class probability, zeroed below
    its threshold."""
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours[:, :2], theirs[:, :2], rtol=0, atol=0.01)
    np.testing.assert_allclose(np.log(ours[:, 2:4]), np.log(theirs[:, 2:4]), rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours[:, 4], theirs[:, 4], rtol=0, atol=1e-4)
    classes = ours[:, 5:]
    if opencv:
        reported = theirs[:, 5:] > 0
        assert reported.any()
        classes = np.where(reported, classes * ours[:, 4:5], 0)
    np.testing.assert_allclose(classes, theirs[:, 5:], rtol=0, atol=1e-4)


@pytest.fixture
def features_cfg():
    return os.path.join(TEST_CFGS, 'features.cfg')


@pytest.fixture(scope='session')
def demo_shapes(tmp_path_factory):
    """A small shapes set (.data path) at the demo models' 128 px, made once per session:
    16 train images (calibration), 24 valid images (evaluation)."""
    from data.make_shapes import generate
    folder = tmp_path_factory.mktemp('demo_shapes')
    return str(generate(folder, seed=11, n_train=16, n_valid=24, img_size=128, workers=1,
                        progress=False))


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models: one thread is as fast, and does not spin against other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def shapes16(tmp_path_factory):
    """16 training and 4 validation shapes images at 32x32, for quick training runs (a
    test file may define its own)."""
    from data.make_shapes import generate
    folder = tmp_path_factory.mktemp('shapes16')
    return str(generate(folder, seed=6, n_train=16, n_valid=4, img_size=32, plain=True,
                        workers=1, progress=False))
