"""export.py --int8: static INT8 quantisation with onnxruntime.quantization.

A refusal without calibration data that writes nothing; then the demo tiny model,
quantised on a few generated images, must hold int8 weights, run, and find the same
objects as its FP32 file: after NMS most confident FP32 detections have an INT8 one of
the same class at IoU >= 0.5 (a loose check: 8-bit activations move scores a little).
No timing is asserted; export.py prints it.
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT

import export
from data.datasets import LoadImagesAndLabels
from evaluation.metrics import box_iou, non_max_suppression
from utils.errors import UserInputError

CFG = os.path.join(ROOT, 'cfg', 'yolov3-tiny-shapes.cfg')
WEIGHTS = os.path.join(ROOT, 'weights', 'yolov3-tiny-shapes.pt')
IMG = 128

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason='demo weights not trained')]


def test_int8_without_calibration_data_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(UserInputError, match='--int8 needs calibration images: pass --data'):
        export.main(['--cfg', CFG, '--weights', WEIGHTS, '--int8', '--output-dir', str(out)])
    assert not out.exists() or not os.listdir(out)


def _detections(path, images):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    outputs = np.concatenate([session.run(None, {'images': image[None]})[0] for image in images])
    return non_max_suppression(torch.from_numpy(outputs), 0.3, 0.5)


def test_int8_file_finds_what_the_fp32_file_finds(demo_shapes, tmp_path):
    result = export.main(['--cfg', CFG, '--weights', WEIGHTS, '--int8', '--data', demo_shapes,
                          '--calibrate-images', '16', '--output-dir', str(tmp_path)])
    fp32, int8 = result['path'], result['int8_path']
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (fp32, int8))
    assert {'fp32_map50', 'int8_map50', 'fp32_latency', 'int8_latency'} <= set(result)
    graph = onnx.load(int8).graph
    int8_kernels = [t for t in graph.initializer
                    if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    convs = [n for n in onnx.load(fp32).graph.node if n.op_type == 'Conv']
    kept_float = 3  # the first conv and the two head convs
    assert len(int8_kernels) == len(convs) - kept_float  # every other conv's kernel is 8-bit
    assert any(n.op_type == 'QuantizeLinear' for n in graph.node)
    valid = os.path.join(os.path.dirname(demo_shapes), 'valid.txt')
    images = [LoadImagesAndLabels(valid, IMG)[k][0].numpy() for k in range(12)]
    found, reference = _detections(int8, images), _detections(fp32, images)
    matched = total = 0
    for ours, theirs in zip(reference, found):
        total += len(ours)
        if len(ours) and len(theirs):
            iou = box_iou(ours[:, :4], theirs[:, :4])
            same = ours[:, 5:6] == theirs[:, 5].view(1, -1)
            matched += int(((iou >= 0.5) & same).any(1).sum())
    assert total >= 12  # the FP32 model does find objects here
    assert matched >= 0.8 * total
