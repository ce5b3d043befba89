"""Our model against two independent readers of the same cfg + .weights files:
OpenCV's Darknet importer (every cfg it reads like Darknet) and a NumPy reference."""
import os

import numpy as np
import pytest
import torch
from conftest import SHIPPED_CFGS, TEST_CFGS, opencv_detections, randomize_weights
from darknet_reference import darknet_forward

from darknet.model import Darknet
from darknet.weights import load_darknet_weights, save_weights

OPENCV_CFGS = SHIPPED_CFGS + [os.path.join(TEST_CFGS, name)
                              for name in ('features.cfg', 'partial_residual.cfg')]


def _ours(model, image):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(image))[0].double().numpy()


def _assert_detections_close(ours, theirs, class_scores_are_products=False):
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours[:, :2], theirs[:, :2], rtol=0, atol=0.01)  # px
    np.testing.assert_allclose(np.log(ours[:, 2:4]), np.log(theirs[:, 2:4]), rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours[:, 4], theirs[:, 4], rtol=0, atol=1e-4)
    if class_scores_are_products:
        # OpenCV reports objectness * class probability, zeroed below its threshold
        products = ours[:, 5:] * ours[:, 4:5]
        reported = theirs[:, 5:] > 0
        assert reported.any()
        np.testing.assert_allclose(products[reported], theirs[:, 5:][reported], atol=1e-4)
    else:
        np.testing.assert_allclose(ours[:, 5:], theirs[:, 5:], rtol=0, atol=1e-4)


@pytest.mark.parametrize('cfg', OPENCV_CFGS, ids=os.path.basename)
def test_model_matches_opencv_darknet_importer(cfg, tmp_path):
    model = randomize_weights(Darknet(cfg), seed=1)
    weights = str(tmp_path / 'random.weights')
    save_weights(model, weights)
    image = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    ours = _ours(model, image)
    assert ours[:, 4].std() > 0.05  # objectness varies: the comparison is not on flat outputs
    _assert_detections_close(ours, opencv_detections(cfg, weights, image, model), True)


def test_model_matches_opencv_on_non_square_input(tmp_path):
    cfg = os.path.join(TEST_CFGS, 'features.cfg')
    model = randomize_weights(Darknet(cfg), seed=2)
    weights = str(tmp_path / 'random.weights')
    save_weights(model, weights)
    image = np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)
    image = np.concatenate([image, image[..., :32]], axis=3)  # 64 high, 96 wide
    _assert_detections_close(_ours(model, image),
                             opencv_detections(cfg, weights, image, model), True)


@pytest.mark.parametrize('name', ['features.cfg', 'route_groups2.cfg', 'partial_residual.cfg'])
def test_model_matches_numpy_reference(name, tmp_path):
    cfg = os.path.join(TEST_CFGS, name)
    model = randomize_weights(Darknet(cfg), seed=3)
    weights = str(tmp_path / 'random.weights')
    save_weights(model, weights)
    image = np.random.default_rng(2).random((1, 3, 32, 64), dtype=np.float32)
    _assert_detections_close(_ours(model, image), darknet_forward(cfg, weights, image[0]))


@pytest.mark.parametrize('cfg', SHIPPED_CFGS, ids=os.path.basename)
def test_save_then_load_is_bit_exact(cfg, tmp_path):
    model = randomize_weights(Darknet(cfg), seed=4)
    model.seen = 123456789012
    first, second = str(tmp_path / 'a.weights'), str(tmp_path / 'b.weights')
    save_weights(model, first)
    reloaded = load_darknet_weights(Darknet(cfg), first)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert reloaded.seen == model.seen
    save_weights(reloaded, second)
    with open(first, 'rb') as f1, open(second, 'rb') as f2:
        assert f1.read() == f2.read()


def test_train_mode_returns_raw_heads_that_decode_to_eval_output(features_cfg):
    model = randomize_weights(Darknet(features_cfg), seed=5)
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        decoded = model.eval()(image)
        model.train()
        for module in model.modules():  # BN on its running statistics, as in eval
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        raw = model(image)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 4, 4, 7), (2, 3, 8, 8, 7)]
    # objectness of head 0, anchor 1, row 2, col 3 sits at flat index (1*4 + 2)*4 + 3
    assert torch.allclose(torch.sigmoid(raw[0][:, 1, 2, 3, 4]), decoded[:, (1 * 4 + 2) * 4 + 3, 4])


@pytest.mark.parametrize('size, stride', [(2, 1), (3, 1), (5, 1), (13, 1), (2, 2), (3, 2)])
def test_maxpool_matches_a_padded_max_pool2d(size, stride):
    """Darknet pooling: padding size - 1, split low/high, filled with -inf."""
    from darknet.layers import MaxPool
    x = torch.randn(2, 3, 12, 10)
    low = (size - 1) // 2
    out_h, out_w = ((n + size - 1 - size) // stride + 1 for n in (12, 10))
    high_h, high_w = ((o - 1) * stride + size - n - low for o, n in ((out_h, 12), (out_w, 10)))
    padded = torch.nn.functional.pad(x, (low, high_w, low, high_h), value=float('-inf'))
    expected = torch.nn.functional.max_pool2d(padded, size, stride)
    assert torch.equal(MaxPool(size, stride, size - 1)(x), expected)
