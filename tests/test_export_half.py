"""export.py --half / export_onnx(half=True): an fp16 graph behind fp32 inputs and outputs,
run by onnxruntime in the test's own session against the fp32 PyTorch model (within
HALF_MAX_DIFFERENCE, 1e-2 of the output scale) and against the fp32 export (it must
differ: the arithmetic really is fp16)."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, TEST_CFGS, randomize_weights

import export
from darknet.model import Darknet
from darknet.weights import save_model_weights
from deploy.onnx_export import HALF_MAX_DIFFERENCE, OnnxModel, export_onnx, share_of_scale
from utils.errors import run_cli

IMG = 64
TINY = os.path.join(ROOT, 'cfg', 'yolov3-tiny-shapes.cfg')
RESIDUAL = os.path.join(TEST_CFGS, 'residual_blocks.cfg')

pytestmark = pytest.mark.usefixtures('one_thread')


def _run(path, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    return session.run(None, {'images': x})


def _parts(outputs, raw):
    return list(outputs) if raw else [outputs[0][..., :4], outputs[0][..., 4:]]


@pytest.mark.parametrize('cfg', [TINY, RESIDUAL])
@pytest.mark.parametrize('raw', [False, True])
def test_half_export_is_fp16_inside_and_close_to_fp32(tmp_path, cfg, raw):
    model = randomize_weights(Darknet(cfg)).eval()
    half, full = tmp_path / 'half.onnx', tmp_path / 'full.onnx'
    reported = export_onnx(model, half, IMG, dynamic_batch=True, raw_heads=raw, half=True)
    export_onnx(model, full, IMG, dynamic_batch=True, raw_heads=raw)
    proto = onnx.load(str(half))
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]  # the conv filters
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {p.key: p.value for p in proto.metadata_props}['precision'] == 'fp16'
    x = np.random.default_rng(3).random((2, 3, IMG, IMG), np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x), raw=True) if raw else [model(torch.from_numpy(x))]
    ours = _parts([t.numpy() for t in ours], raw)
    theirs, fp32 = _parts(_run(half, x), raw), _parts(_run(full, x), raw)
    worst = max(share_of_scale(a, b) for a, b in zip(ours, theirs))
    assert worst <= HALF_MAX_DIFFERENCE and reported <= HALF_MAX_DIFFERENCE
    # rounding to 11 bits shows: an fp32 graph under another name would be within 1e-6
    assert max(share_of_scale(a, b) for a, b in zip(fp32, theirs)) > 1e-5


def test_half_file_evaluates_like_an_fp32_one(tmp_path):
    """test.py reads an fp16 file as it reads the fp32 one: float32 in, float32 out."""
    model = randomize_weights(Darknet(TINY)).eval()
    path = tmp_path / 'half.onnx'
    export_onnx(model, path, IMG, half=True)
    x = torch.rand(3, 3, IMG, IMG)
    out = OnnxModel(path)(x)
    with torch.no_grad():
        reference = model(x)
    assert out.dtype == torch.float32
    assert share_of_scale(reference[..., 4:].numpy(), out[..., 4:].numpy()) <= HALF_MAX_DIFFERENCE


def _cli(argv, capsys):
    try:
        run_cli(export.main, argv)
        code = None
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_cli_half_writes_a_checked_fp16_file(tmp_path, capsys):
    weights = tmp_path / 'tiny.pt'
    save_model_weights(randomize_weights(Darknet(TINY)).eval(), str(weights))
    out_path = tmp_path / 'out' / 'tiny-fp16.onnx'
    code, out, err = _cli(['--cfg', TINY, '--weights', str(weights), '--img-size', str(IMG),
                           '--output', str(out_path), '--half'], capsys)
    assert code is None and not err
    assert 'limit 0.01, fp16 against fp32' in out
    weights_types = {i.data_type for i in onnx.load(str(out_path)).graph.initializer
                     if len(i.dims) == 4}
    assert weights_types == {onnx.TensorProto.FLOAT16}


def test_cli_refuses_half_with_int8(tmp_path, capsys):
    weights = tmp_path / 'tiny.pt'
    save_model_weights(randomize_weights(Darknet(TINY)).eval(), str(weights))
    data = os.path.join(ROOT, 'data', 'shapes.data')
    code, _, err = _cli(['--cfg', TINY, '--weights', str(weights), '--output',
                         str(tmp_path / 'x.onnx'), '--half', '--int8', '--data', data], capsys)
    assert code == 2 and len(err) == 1 and 'drop --half' in err[0]
    assert not (tmp_path / 'x.onnx').exists()
