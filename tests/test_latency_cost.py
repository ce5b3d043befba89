"""pruning/latency.py: the latency table, its predictions and the per-channel latency cost.

No timing is asserted: a fake timer gives each conv a time bilinear in its input and
output widths (so the table's bilinear interpolation must reproduce it exactly, at any
widths), and the predictions are held against that fake timer applied to the compact
model's real conv shapes. The real timers are run once on tiny convs for shape and sign
only, and the ONNX graph they time is checked against PyTorch's conv.
"""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from darknet.layers import ACTIVATIONS
from darknet.model import Darknet
from pruning import latency
from pruning.graph import analyze_graph, prunable_units
from pruning.latency import (ConvSpec, OrtTimer, TorchTimer, compact_widths, conv_graph,
                             latency_costs, latency_table, make_timer, predicted_latency,
                             profile_seconds)
from pruning.plan import plan_masks
from pruning.surgery import prune
from utils.errors import UserInputError

IMG = 64
CASES = [('residual_blocks.cfg', 'shortcut'), ('residual_blocks.cfg', 'normal'),
         ('small_detector.cfg', 'tiny'), ('partial_residual.cfg', 'shortcut')]
REST = 0.003


def fake_conv(s):
    """Seconds bilinear in (in, out) widths, scaled by the pixels and kernel."""
    cells = s.height * s.width / s.stride ** 2
    return 1e-9 * cells * (s.size ** 2 * s.in_ch * s.out_ch / s.groups + 3 * s.in_ch
                           + 5 * s.out_ch) + 2e-5


class FakeTimer:
    def __init__(self, batch=1):
        self.batch, self.conv_calls, self.model_calls = batch, 0, 0

    def key(self):
        return {'backend': 'fake', 'batch': self.batch}

    def time_convs(self, specs):
        self.conv_calls += 1
        return [fake_conv(s) for s in specs]

    def time_model(self, model, img_size):
        self.model_calls += 1
        return fake_latency(model, img_size)


def fake_latency(model, img_size):
    """The fake timer's truth for a built model: its convs at their real shapes."""
    total = REST
    for i, layer in enumerate(model.module_defs):
        if layer['type'] == 'convolutional':
            conv = model.module_list[i].Conv2d
            total += fake_conv(latency.conv_spec(model, i, conv.in_channels,
                                                 conv.out_channels, img_size))
    return total


def _model(cfg):
    return randomize_weights(Darknet(os.path.join(TEST_CFGS, cfg))).eval()


@pytest.mark.parametrize('cfg,mode', CASES)
@pytest.mark.parametrize('percent', [0.2, 0.5, 0.85])
def test_compact_widths_are_the_compact_models(cfg, mode, percent):
    model = _model(cfg)
    plan = plan_masks(model, mode, percent, layer_keep=0.05)
    _, compact = prune(model, plan)
    widths = compact_widths(model, plan.masks)
    for i, (c_in, c_out) in widths.items():
        conv = compact.module_list[i].Conv2d
        assert (c_in, c_out) == (conv.in_channels, conv.out_channels), f'layer {i}'


@pytest.mark.parametrize('cfg,mode', CASES)
def test_predicted_latency_is_exact_for_a_bilinear_device(cfg, mode, tmp_path):
    """Off the grid, unaligned and below its smallest widths (85% cut) alike."""
    model = _model(cfg)
    table = latency_table(model, mode, IMG, FakeTimer(), cache_dir=tmp_path)
    assert table.latency == pytest.approx(fake_latency(model, IMG))
    assert predicted_latency(table, model) == pytest.approx(table.latency, rel=1e-12)
    for percent in (0.2, 0.5, 0.85):
        plan = plan_masks(model, mode, percent, layer_keep=0.05)
        truth = fake_latency(prune(model, plan)[1], IMG)
        assert predicted_latency(table, model, plan.masks) == pytest.approx(truth, rel=1e-9)


def test_latency_cost_is_the_slope_worked_by_hand():
    """small_detector in tiny mode: cutting one channel of a conv whose output one conv
    reads saves its own filter's time and the consumer's column: with the fake timer's
    coefficients, exactly (size^2 * in + 5) * cells of its own plus
    (size_j^2 * out_j + 3) * cells_j of the consumer, times 1e-9 s."""
    model = _model('small_detector.cfg')
    table = latency_table(model, 'tiny', IMG, FakeTimer(), cache_dir=None)
    _, units, _ = prunable_units(model, 'tiny')
    costs = latency_costs(table, model, units)
    assert [len(c) for c in costs] == [model.module_list[u[0]].Conv2d.out_channels
                                       for u in units]
    info = analyze_graph(model.module_defs)
    cells = lambda spec: spec.height * spec.width / spec.stride ** 2
    for (i,), cost in zip(units, costs):
        own = latency.conv_spec(model, i, model.module_list[i].Conv2d.in_channels, 0, IMG)
        slope = cells(own) * (own.size ** 2 * own.in_ch + 5)
        for j, layer in enumerate(model.module_defs):
            if layer['type'] == 'convolutional' and any(
                    (i, 0) in origin for origin in info.origins[j - 1]):
                reader = latency.conv_spec(model, j, 0, layer['filters'], IMG)
                slope += cells(reader) * (reader.size ** 2 * reader.out_ch + 3)
        assert torch.allclose(cost, torch.full_like(cost, 1e-9 * slope * 1e3), rtol=1e-6)


def test_a_cut_that_saves_nothing_is_priced_last(tmp_path):
    """A device where the first unit's conv and the conv reading it take a constant
    time: cutting that unit saves nothing, so its channels get the floor (1e-3 of the
    median saving), below every other unit's cost: score / cost keeps them to the end."""
    model = _model('small_detector.cfg')
    info, units, _ = prunable_units(model, 'tiny')
    first = units[0][0]
    reader = next(j for j, layer in enumerate(model.module_defs)
                  if layer['type'] == 'convolutional'
                  and any((first, 0) in o for o in info.origins[j - 1]))
    flat = {latency.conv_spec(model, i, 1, 1, IMG).height for i in (first, reader)}

    class Flat(FakeTimer):
        def time_convs(self, specs):
            return [1e-4 if s.height in flat else fake_conv(s) for s in specs]

    table = latency_table(model, 'tiny', IMG, Flat(), cache_dir=tmp_path)
    costs = latency_costs(table, model, units)
    positive = [float(c[0]) for c in costs[1:]]
    assert all(p > 0 for p in positive)
    assert float(costs[0][0]) == pytest.approx(1e-3 * float(np.median(positive)))


def test_the_cache_is_read_back_and_keyed_by_the_target(tmp_path):
    model = _model('small_detector.cfg')
    timer = FakeTimer()
    first = latency_table(model, 'tiny', IMG, timer, cache_dir=tmp_path)
    again = latency_table(model, 'tiny', IMG, timer, cache_dir=tmp_path)
    assert timer.conv_calls == 1 and timer.model_calls == 1
    assert again.convs == first.convs and again.latency == first.latency
    other = FakeTimer(batch=8)
    latency_table(model, 'tiny', IMG, other, cache_dir=tmp_path)
    latency_table(model, 'tiny', 96, timer, cache_dir=tmp_path)
    assert other.conv_calls == 1 and timer.conv_calls == 2
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3 and all(f.endswith('.json') for f in files)
    for name in files:  # a damaged entry is measured again and replaced
        (tmp_path / name).write_text('{not json')
    latency_table(model, 'tiny', IMG, timer, cache_dir=tmp_path)
    assert timer.conv_calls == 3
    assert any(json.loads((tmp_path / f).read_text()).get('version') == 1 for f in files)


def test_profile_events_are_summed_per_spec_and_run():
    """Runs after the first, per spec the sum of its nodes; layout reorders belong to none."""
    def node(name, ts, dur):
        return {'cat': 'Node', 'name': f'{name}_kernel_time', 'ts': ts, 'dur': dur, 'args': {}}
    runs = [{'cat': 'Session', 'name': 'model_run', 'ts': t, 'dur': 90} for t in (0, 100, 200)]
    events = runs + [node('conv0', 1, 999), node('y1_nchwc', 2, 999)]
    for start, extra in ((100, 0), (200, 10)):
        events += [node('conv0', start + 1, 10 + extra), node('ReorderInput', start + 2, 50),
                   node('y1_nchwc', start + 3, 20), node('act1_0', start + 4, 4 + extra)]
    seconds = profile_seconds(events, 2)
    assert seconds == pytest.approx([15e-6, 29e-6])


@pytest.mark.parametrize('act', ['leaky', 'linear', 'mish', 'swish', 'logistic', 'relu'])
def test_the_timed_onnx_graph_is_the_conv_it_stands_for(act):
    spec = ConvSpec(6, 5, 3, 2, 1, 1, 12, 12, act)
    proto = conv_graph([spec], batch=2)
    weights = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
               for i in proto.graph.initializer}
    x = np.random.default_rng(0).random((2, 6, 12, 12), np.float32)
    (ours,) = ort.InferenceSession(proto.SerializeToString(),
                                   providers=['CPUExecutionProvider']).run(None, {'x0': x})
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), weights['w0'], weights['b0'], 2, 1)
    reference = ACTIVATIONS[act].function(conv)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-5)


def test_real_timers_give_one_positive_time_per_spec():
    specs = [ConvSpec(8, 16, 3, 1, 1, 1, 16, 16, 'leaky'), ConvSpec(16, 8, 1, 1, 0, 1, 16, 16,
                                                                    'linear')]
    for timer in (OrtTimer(repeats=2), TorchTimer('cpu', repeats=2)):
        seconds = timer.time_convs(specs)
        assert len(seconds) == 2 and all(s > 0 for s in seconds)


def test_targets_the_timers_cannot_measure_are_refused():
    assert isinstance(make_timer(), OrtTimer)
    assert isinstance(make_timer(backend='torch'), TorchTimer)
    with pytest.raises(UserInputError, match='onnxruntime'):
        make_timer(precision='fp16', backend='onnxruntime')
    with pytest.raises(UserInputError, match='fp32 or fp16'):
        make_timer(precision='int4', backend='torch')


@pytest.mark.parametrize('cfg,mode', CASES)
def test_target_latency_prune_reaches_the_target_on_the_timer_truth(cfg, mode, monkeypatch,
                                                                   tmp_path):
    """The prune script's --target-latency road with the fake timer: the compact model it
    writes is at most the asked share of the original's latency by the timer's own truth
    (its convs at their real shapes), not only by the table's prediction."""
    import pruning.plan
    from cli.prune import main
    from darknet.weights import save_weights
    monkeypatch.setattr(pruning.plan, 'make_timer', lambda device: FakeTimer())
    model = _model(cfg)
    weights = str(tmp_path / 'model.weights')
    save_weights(model, weights)
    result = main(mode, ['--cfg', os.path.join(TEST_CFGS, cfg), '--weights', weights,
                         '--img-size', '64', '--target-latency', '0.3', '--no-latency',
                         '--output-dir', str(tmp_path / 'out')])
    written = Darknet(result['cfg']).eval()
    assert result['plan'].settings.cost == 'latency'
    assert fake_latency(written, 64) <= (1 - 0.3 + 0.02) * fake_latency(model, 64)
