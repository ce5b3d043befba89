"""Model cost figures: analytic MACs against counting what the convolutions really do."""
import os

import pytest
import torch
from conftest import SHIPPED_CFGS, TEST_CFGS

from darknet.model import Darknet
from utils.torch_utils import count_macs, measure_latency


def _hooked_macs(model, img_size):
    total = []

    def hook(module, inputs, output):  # output elements x (in / groups) x kh x kw
        total.append(output.numel() * module.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    for handle in handles:
        handle.remove()
    return sum(total)


@pytest.mark.parametrize('cfg', [c for c in SHIPPED_CFGS if 'shapes' in c or 'tiny' in c]
                         + [os.path.join(TEST_CFGS, 'features.cfg')], ids=os.path.basename)
def test_macs_match_a_counting_forward_pass(cfg):
    model = Darknet(cfg)
    assert count_macs(model, 64) == _hooked_macs(model, 64)


@pytest.mark.parametrize('name, bflops', [('yolov3', 65.86), ('yolov3-tiny', 5.56),
                                          ('yolov4-tiny', 6.91)])
def test_published_figures(name, bflops):
    """Darknet prints these BFLOPs (2 x MACs) at 416x416."""
    cfg = os.path.join(os.path.dirname(TEST_CFGS), '..', 'cfg', f'{name}.cfg')
    assert round(2 * count_macs(Darknet(cfg), 416) / 1e9, 2) == bflops


def test_latency_is_a_positive_median():
    model = Darknet(os.path.join(TEST_CFGS, 'features.cfg'))
    assert 0 < measure_latency(model, 64, min_runs=3, budget=0.0) < 5
