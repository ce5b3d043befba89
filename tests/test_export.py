"""ONNX export (export.py, deploy/onnx_export.py): the written file, run by onnxruntime in
the test's own session on its own input, against our PyTorch model.

Two roads each time: onnxruntime's outputs against the model's eval output (decoded) or
its raw heads; and for raw heads, a plain numpy decode written here from the cfg's
anchors against the model's decoded output. YOLOv3-like and tiny-like cfgs, compact
pruned models too, at 64x64 with random weights; the full-size shipped cfgs are slow.
"""
import copy
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, SHIPPED_CFGS, TEST_CFGS, randomize_weights

import export
from darknet.model import Darknet
from darknet.weights import save_model_weights, save_weights
from deploy.onnx_export import OnnxCheckError, export_onnx, onnx_latency
from pruning.graph import analyze_graph
from pruning.plan import plan_masks
from pruning.surgery import prune
from utils.errors import UserInputError, run_cli

IMG = 64
TINY = os.path.join(ROOT, 'cfg', 'yolov3-tiny-shapes.cfg')
YOLOV3 = os.path.join(ROOT, 'cfg', 'yolov3-shapes.cfg')
FULL = {'yolov3.cfg', 'yolov3-spp.cfg'}  # 62M parameters each: slow
INSTALL = 'pip install -r requirements-onnx.txt'

pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------- helpers

def _model(cfg, pruned=False, seed=0):
    """A random-weight model in eval mode; pruned: the compact model of a 40% cut
    (shortcut mode where the cfg has shortcuts, else tiny mode)."""
    model = randomize_weights(Darknet(cfg), seed).eval()
    if not pruned:
        return model
    mode = 'shortcut' if analyze_graph(model.module_defs).has_shortcut else 'tiny'
    _, compact = prune(model, plan_masks(model, mode, 0.4))
    assert sum(p.numel() for p in compact.parameters()) < \
        0.8 * sum(p.numel() for p in model.parameters())
    return compact.eval()


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def _input(batch, seed=1):
    return np.random.default_rng(seed).random((batch, 3, IMG, IMG), np.float32)


def _close(theirs, ours, share=1e-4):
    """onnxruntime within `share` of the largest magnitude of our output."""
    assert theirs.shape == ours.shape
    assert np.isfinite(theirs).all() and np.isfinite(ours).all()
    assert np.abs(theirs - ours).max() <= share * np.abs(ours).max()


def _decode(heads, layers, img_size):
    """Raw heads (B, A, H, W, 5+C) -> (B, N, 5+C) as the [yolo] layer defines it, from the
    cfg's anchors, mask and scale_x_y."""
    yolos = [layer for layer in layers if layer['type'] == 'yolo']
    out = []
    for head, layer in zip(heads, yolos):
        batch, _, ny, nx, no = head.shape
        head = head.astype(np.float64)
        anchors = np.array([layer['anchors'][2 * m: 2 * m + 2] for m in layer['mask']])
        s = layer.get('scale_x_y', 1.0)
        sigmoid = 1 / (1 + np.exp(-head))
        col, row = np.meshgrid(np.arange(nx), np.arange(ny))
        x = (sigmoid[..., 0] * s - (s - 1) / 2 + col) * (img_size / nx)
        y = (sigmoid[..., 1] * s - (s - 1) / 2 + row) * (img_size / ny)
        w = np.exp(head[..., 2]) * anchors[:, 0].reshape(1, -1, 1, 1)
        h = np.exp(head[..., 3]) * anchors[:, 1].reshape(1, -1, 1, 1)
        boxes = np.stack((x, y, w, h), -1)
        out.append(np.concatenate((boxes, sigmoid[..., 4:]), -1).reshape(batch, -1, no))
    return np.concatenate(out, 1)


def _digest(*paths):
    return [hashlib.sha256(open(p, 'rb').read()).hexdigest() for p in paths]


# ---------------------------------------------------------------- export round trips

ROUND_TRIPS = [pytest.param(cfg, pruned, raw, id=f'{os.path.basename(cfg)[:-4]}'
                            f'{"-pruned" if pruned else ""}{"-raw" if raw else ""}')
               for cfg in (TINY, YOLOV3) for pruned in (False, True) for raw in (False, True)]


@pytest.mark.parametrize('cfg, pruned, raw', ROUND_TRIPS)
def test_export_round_trips_through_onnxruntime(tmp_path, cfg, pruned, raw):
    """Pruned models export with a dynamic batch, the others with batch 1."""
    model = _model(cfg, pruned)
    path = tmp_path / 'model.onnx'
    difference = export_onnx(model, str(path), IMG, dynamic_batch=pruned, raw_heads=raw)
    assert 0 <= difference <= 1e-4
    assert os.listdir(tmp_path) == ['model.onnx']  # no temporary file left
    onnx.checker.check_model(str(path))
    session = _session(path)
    batch = 3 if pruned else 1  # 3: neither of the export check's batch sizes
    expected_input = ['batch' if pruned else 1, 3, IMG, IMG]
    assert session.get_inputs()[0].shape == expected_input
    x = _input(batch)
    theirs = session.run(None, {'images': x})
    with torch.no_grad():
        decoded = model(torch.from_numpy(x)).numpy()
        heads = [h.numpy() for h in model(torch.from_numpy(x), raw=True)]
    if raw:
        assert [o.name for o in session.get_outputs()] == [f'head{k}' for k in range(len(heads))]
        for t, h in zip(theirs, heads):
            _close(t, h)
        # the second road: the raw heads decoded here give our decoded output
        _close(_decode(theirs, model.module_defs, IMG), decoded)
        strides = json.loads(session.get_modelmeta().custom_metadata_map['strides'])
        assert strides == [IMG / t.shape[3] for t in theirs]
    else:
        (detections,) = theirs
        _close(detections[..., :4], decoded[..., :4])
        _close(detections[..., 4:], decoded[..., 4:])


def _cfg_cases():
    cases = []
    for cfg in SHIPPED_CFGS + sorted(glob.glob(os.path.join(TEST_CFGS, '*.cfg'))):
        name = os.path.basename(cfg)
        marks = [pytest.mark.slow] if name in FULL else []
        cases.append(pytest.param(cfg, id=name, marks=marks))
    return cases


@pytest.mark.parametrize('cfg', _cfg_cases())
def test_every_cfg_exports(tmp_path, cfg):
    """Every shipped and test cfg (SPP pools, grouped routes, mish/swish, scale_x_y)."""
    model = _model(cfg)
    path = str(tmp_path / 'model.onnx')
    export_onnx(model, path, IMG, dynamic_batch=True, opset=11)
    x = _input(2, seed=2)
    (theirs,) = _session(path).run(None, {'images': x})
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    _close(theirs[..., :4], ours[..., :4])
    _close(theirs[..., 4:], ours[..., 4:])


def test_export_keeps_the_model_mode(tmp_path):
    model = _model(TINY).train()
    export_onnx(model, str(tmp_path / 'model.onnx'), IMG, raw_heads=True)
    assert model.training and all(m.training for m in model.modules())


def _perturbed_export(monkeypatch):
    """torch.onnx.export, but of a copy whose first conv is off: a wrong graph."""
    original = torch.onnx.export

    def export_wrong(module, args, f, **kwargs):
        module = copy.deepcopy(module)
        conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            conv.weight.add_(0.05)
        return original(module, args, f, **kwargs)
    monkeypatch.setattr(torch.onnx, 'export', export_wrong)


def test_a_wrong_graph_fails_the_check_and_leaves_nothing(tmp_path, monkeypatch):
    _perturbed_export(monkeypatch)
    path = tmp_path / 'out' / 'model.onnx'
    with pytest.raises(OnnxCheckError, match='nothing was written'):
        export_onnx(_model(TINY), str(path), IMG)
    assert os.listdir(tmp_path / 'out') == []


# ---------------------------------------------------------------- latency

def test_onnx_latency(tmp_path):
    static, dynamic = str(tmp_path / 'static.onnx'), str(tmp_path / 'dynamic.onnx')
    model = _model(TINY)
    export_onnx(model, static, IMG)
    export_onnx(model, dynamic, IMG, dynamic_batch=True)
    assert 0 < onnx_latency(static, IMG, runs=3) < 5
    assert 0 < onnx_latency(dynamic, IMG, batch=2, runs=3) < 5
    with pytest.raises(UserInputError, match='--dynamic-batch'):
        onnx_latency(static, IMG, batch=2)
    with pytest.raises(UserInputError, match='--img-size 128'):
        onnx_latency(static, 128)


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def files(tmp_path):
    """A random-weight tiny model's cfg and .pt in a folder of their own."""
    folder = tmp_path / 'inputs'
    folder.mkdir()
    weights = folder / 'tiny.pt'
    save_model_weights(_model(TINY), str(weights))
    return TINY, str(weights)


def _cli(argv, capsys):
    """run_cli(export.main) in this process: (exit code or None, stdout, stderr lines)."""
    try:
        run_cli(export.main, argv)
        code = None
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_cli_writes_a_checked_file(files, tmp_path, capsys):
    cfg, weights = files
    before = _digest(cfg, weights)
    out_dir = tmp_path / 'out'
    code, out, err = _cli(['--cfg', cfg, '--weights', weights, '--img-size', str(IMG),
                           '--output-dir', str(out_dir), '--dynamic-batch'], capsys)
    assert code is None and not err
    assert os.listdir(out_dir) == ['yolov3-tiny-shapes.onnx']  # named after the cfg
    assert 'onnxruntime vs PyTorch (batch 1 and 2): largest difference' in out
    assert _digest(cfg, weights) == before
    x = _input(2)
    (theirs,) = _session(out_dir / 'yolov3-tiny-shapes.onnx').run(None, {'images': x})
    model = export.load_weights(Darknet(cfg), weights).eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    _close(theirs[..., :4], ours[..., :4])
    _close(theirs[..., 4:], ours[..., 4:])


@pytest.mark.parametrize('missing', ['onnx', 'onnxruntime'])
def test_cli_refuses_without_the_optional_packages(files, tmp_path, capsys, monkeypatch,
                                                   missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what an absent package raises
    cfg, weights = files
    code, _, err = _cli(['--cfg', cfg, '--weights', weights, '--output-dir',
                           str(tmp_path / 'out')], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith('error: ') and f'package {missing},' in err[0] and INSTALL in err[0]
    assert not (tmp_path / 'out').exists()


def test_cli_refuses_to_overwrite_an_input(files, tmp_path, capsys):
    cfg, weights = files
    before = _digest(weights)
    code, _, err = _cli(['--cfg', cfg, '--weights', weights, '--output', weights], capsys)
    assert code == 2 and len(err) == 1 and 'would overwrite an input file' in err[0]
    # a Darknet file named <cfg name>.onnx would be its own default output in its folder
    darknet = tmp_path / 'inputs' / 'yolov3-tiny-shapes.onnx'
    save_weights(_model(TINY), str(darknet))
    darknet_before = _digest(darknet)
    code, _, err = _cli(['--cfg', cfg, '--weights', str(darknet), '--output-dir',
                         str(darknet.parent)], capsys)
    assert code == 2 and len(err) == 1 and 'would overwrite an input file' in err[0]
    assert _digest(weights) == before and _digest(darknet) == darknet_before


def test_cli_failed_check_exits_nonzero_and_leaves_nothing(files, tmp_path, capsys,
                                                           monkeypatch):
    _perturbed_export(monkeypatch)
    cfg, weights = files
    code, _, _ = _cli(['--cfg', cfg, '--weights', weights, '--img-size', str(IMG),
                       '--output-dir', str(tmp_path / 'out')], capsys)
    # SystemExit('error: ...'): Python prints the text and exits 1
    assert isinstance(code, str) and code.startswith('error: ') and '\n' not in code
    assert 'of the output scale (limit 0.0001); nothing was written' in code
    assert os.listdir(tmp_path / 'out') == []


@pytest.mark.parametrize('flags, needle', [
    (['--opset', '9'], '--opset 9: the exporter writes opsets 11 to 20'),
    (['--img-size', '60'], '--img-size 60 is not a multiple of the model stride 32'),
    (['--output', 'model.pt'], 'name the ONNX file with a .onnx extension'),
])
def test_cli_refuses_bad_flags(files, tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.chdir(tmp_path)
    cfg, weights = files
    code, _, err = _cli(['--cfg', cfg, '--weights', weights] + flags, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'model.pt').exists()


def test_cli_without_arguments_wants_the_demo_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no trained demo weights here, whatever the repo holds
    code, _, err = _cli([], capsys)
    assert code == 2 and len(err) == 1
    assert 'weights/yolov3-shapes.pt: the demo model has not been trained yet' in err[0]


def test_cli_refusal_is_one_line_without_traceback(files):
    cfg, weights = files
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'export.py'), '--cfg', cfg,
                             '--weights', weights, '--output', weights],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ')
    assert 'Traceback' not in result.stderr + result.stdout


def _decode_from_metadata(heads, meta):
    """Raw heads (B, A, H, W, 5+C) -> (B, N, 5+C) with nothing but the file's metadata."""
    anchors, scales = json.loads(meta['anchors']), json.loads(meta['scale_x_y'])
    strides, classes = json.loads(meta['strides']), int(meta['classes'])
    assert len(anchors) == len(scales) == len(strides) == len(heads)
    out = []
    for head, pairs, s, stride in zip(heads, anchors, scales, strides):
        batch, count, ny, nx, no = head.shape
        assert (count, no) == (len(pairs), 5 + classes)
        head = head.astype(np.float64)
        sigmoid = 1 / (1 + np.exp(-head))
        col, row = np.meshgrid(np.arange(nx), np.arange(ny))
        pairs = np.array(pairs, np.float64).reshape(1, -1, 1, 1, 2)
        xy = (sigmoid[..., :2] * s - (s - 1) / 2 + np.stack((col, row), -1)) * stride
        wh = np.exp(head[..., 2:4]) * pairs
        out.append(np.concatenate((xy, wh, sigmoid[..., 4:]), -1).reshape(batch, -1, no))
    return np.concatenate(out, 1)


def test_metadata_holds_the_cfgs_anchors_scales_and_classes(tmp_path):
    """features.cfg's heads, read off its text: the first [yolo] takes mask 3,4,5 of
    the anchors with scale_x_y=1.1, the second mask 0,1,2 with none (1.0); 2 classes.
    The metadata alone then decodes the raw heads into the model's decoded output."""
    model = _model(os.path.join(TEST_CFGS, 'features.cfg'))
    path = tmp_path / 'model.onnx'
    export_onnx(model, str(path), IMG, raw_heads=True)
    session = _session(path)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta['anchors']) == [[[30, 20], [40, 48], [60, 50]],
                                           [[6, 8], [12, 10], [16, 24]]]
    assert json.loads(meta['scale_x_y']) == pytest.approx([1.1, 1.0])
    assert int(meta['classes']) == 2 and int(meta['img_size']) == IMG
    x = _input(1, seed=4)
    heads = session.run(None, {'images': x})
    assert json.loads(meta['strides']) == [IMG / h.shape[3] for h in heads]
    with torch.no_grad():
        decoded = model(torch.from_numpy(x)).numpy()
    _close(_decode_from_metadata(heads, meta), decoded)
