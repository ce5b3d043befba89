"""ONNX export of any Darknet model the project builds, checked by onnxruntime, and its
onnxruntime CPU latency.

    from deploy.onnx_export import export_onnx, onnx_latency
    difference = export_onnx(model, 'runs/export/model.onnx', 416, dynamic_batch=True)
    seconds = onnx_latency('runs/export/model.onnx', 416)

onnx and onnxruntime are optional (requirements-onnx.txt): they are imported only when
a function here needs them, and their absence is a one-line UserInputError.

Outputs of an exported graph, input 'images' (B, C, S, S) float32 in [0, 1]:
  decoded (default)  'detections' (B, N, 5+C): the eval-mode output of `Darknet`, boxes
                     x, y, w, h in input pixels, then objectness and class scores
                     (sigmoid); heads in cfg order, each in (anchor, row, col) order.
  raw heads          'head0', 'head1', ... in cfg order, (B, A, H, W, 5+C) each, A the
                     head's anchors (its mask order), H = W = S / stride: tx, ty, tw, th,
                     objectness and class logits before any sigmoid or exp. Decode as the
                     [yolo] layer does: x = (sigmoid(tx) * s - (s - 1) / 2 + col) * stride,
                     w = exp(tw) * anchor_w, scores = sigmoid(logits); the file's metadata
                     holds each head's stride, anchors and scale_x_y s.
The spatial size S is fixed in the graph; the batch is 1 unless exported dynamic.

The check: the largest difference between onnxruntime and the PyTorch model on one
random input, as a share of the output scale, max|onnx - torch| / max|torch| taken per
output part (the decoded boxes, the decoded scores; or each raw head), the largest
part reported. Above MAX_DIFFERENCE the export fails and writes nothing.
"""
import contextlib
import copy
import inspect
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

from darknet.model import Darknet
from darknet.weights import load_weights
from utils.errors import UserInputError
from utils.fileio import atomic_output

MAX_DIFFERENCE = 1e-4  # onnxruntime vs PyTorch, as a share of the output scale
# an fp16 graph (half=True) against the fp32 PyTorch model: fp16 keeps 11 significant
# bits, and exp() of a box's tw, th carries their rounding into its width and height
HALF_MAX_DIFFERENCE = 1e-2
# 17 is read by every runtime these models are deployed to (onnxruntime, TensorRT 8.6+,
# OpenCV 4.8+); later opsets add nothing the Darknet layers use. The TorchScript
# exporter writes 11 (the Resize and Pad the upsample and pools need) to 20.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20
INPUT_NAME = 'images'
# The TorchScript exporter: it works on every torch the project admits (2.4 to 2.13) and
# needs no onnxscript, while the torch.export-based one (the default from 2.9) is absent
# from 2.4, is about ten times slower on these models and prints its progress.
TORCHSCRIPT = ({'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters
               else {})
INSTALL_HINT = 'pip install -r requirements-onnx.txt'


class OnnxCheckError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


def require_onnx():
    """(onnx, onnxruntime), or a one-line refusal naming the package that is missing."""
    modules = []
    for name in ('onnx', 'onnxruntime'):
        try:
            modules.append(__import__(name))
        except ImportError as e:
            problem = ('is not installed' if isinstance(e, ModuleNotFoundError)
                       else f'cannot be imported ({e})')
            raise UserInputError(f'the ONNX export needs the optional package {name}, which '
                                 f'{problem}; install it with: {INSTALL_HINT}') from None
    return tuple(modules)


def check_opset(opset):
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserInputError(f'--opset {opset}: the exporter writes opsets {MIN_OPSET} to '
                             f'{MAX_OPSET}; {DEFAULT_OPSET} (the default) suits most runtimes')
    return opset


class _RawHeads(nn.Module):
    """The model with its raw heads as outputs: a tuple traces to one output per head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model(x, raw=True))


class _Half(nn.Module):
    """An fp16 model behind fp32 inputs and outputs: the graph casts 'images' to fp16
    first and every output back to fp32 last, so a consumer of the fp32 file reads the
    fp16 one the same way; weights and activations in between are fp16."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x.half())
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def output_names(model, raw_heads):
    return [f'head{k}' for k in range(len(model.yolo_layers))] if raw_heads else ['detections']


def _metadata(model, img_size, raw_heads):
    """What a consumer needs to read the outputs without the cfg."""
    strides = [model.layer_strides[i] for i, layer in enumerate(model.module_defs)
               if layer['type'] == 'yolo']
    return {'layout': 'raw_heads (B, A, H, W, 5+C)' if raw_heads
            else 'detections (B, N, 5+C): x, y, w, h in pixels, objectness, classes',
            'img_size': str(img_size), 'classes': str(model.num_classes),
            'strides': json.dumps(strides),
            'anchors': json.dumps([y.anchors.tolist() for y in model.yolo_layers]),
            'scale_x_y': json.dumps([y.scale_x_y for y in model.yolo_layers])}


def _export_bytes(model, img_size, dynamic_batch, opset, raw_heads, half=False):
    """The serialised graph of `model` (eval mode, on the CPU) at one spatial size. The
    exporter puts the module it is given back in that module's mode afterwards, which
    for a wrapper in train mode would be the model's too: the wrapper is made eval."""
    channels = model.hyperparams.get('channels', 3)
    x = torch.rand(1, channels, img_size, img_size)
    if half:
        model = model.half()
    with torch.no_grad():
        # the size checks a trace skips: a bad input size or route is refused here
        model(x.to(next(model.parameters()).dtype))
    names = output_names(model, raw_heads)
    dynamic = ({name: {0: 'batch'} for name in [INPUT_NAME] + names} if dynamic_batch
               else None)
    # The tracer warns where shape arithmetic becomes constants: the spatial size is fixed
    # by design, the batch stays symbolic, and the onnxruntime check proves the graph
    # either way. The other two: the exporter's own deprecation, and a Slice it leaves
    # for the runtime's optimizer to fold.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.filterwarnings('ignore', message='Constant folding - Only steps=1')
        try:
            subject = _RawHeads(model).eval() if raw_heads else model
            torch.onnx.export(_Half(subject).eval() if half else subject, (x,), buffer,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes=dynamic, opset_version=opset, **TORCHSCRIPT)
        except torch.onnx.errors.OnnxExporterError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserInputError(f'the exporter cannot write {model._name()} at opset {opset} '
                                 f'({first}); try a newer --opset') from None
    return buffer.getvalue()


def _parts(outputs, raw_heads):
    """The output parts compared separately: each raw head, or boxes and scores."""
    if raw_heads:
        return list(outputs)
    (detections,) = outputs
    return [detections[..., :4], detections[..., 4:]]


def share_of_scale(ours, theirs):
    """max|theirs - ours| / max|ours|; equal values (infinities too) differ by 0."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        return float('inf')
    diff = np.where(ours == theirs, 0.0, np.abs(theirs - ours))  # nan stays nan
    finite = np.abs(ours[np.isfinite(ours)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1e-12)
    return float(diff.max()) / scale if diff.size else 0.0


def ort_session(path, threads=None, spinning=True):
    """An onnxruntime CPU session with `threads` intra-op threads (default: torch's
    count) and one inter-op thread, quiet below errors. `spinning=False` lets its
    threads sleep as soon as a run ends, instead of busy-waiting for the next: what a
    process that also runs other sessions or PyTorch needs, or they take turns slowing
    each other."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=['CPUExecutionProvider'])


def onnx_difference(path, model, img_size, batch_sizes=(1,), raw_heads=False, seed=0):
    """Largest difference between the ONNX file and `model` (eval mode, CPU) on random
    inputs of each batch size, as a share of the output scale (see the module notes)."""
    session = ort_session(path)
    channels = model.hyperparams.get('channels', 3)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = torch.rand(batch, channels, img_size, img_size, generator=generator)
        with torch.no_grad():
            ours = model(x, raw=True) if raw_heads else [model(x)]
        theirs = session.run(None, {INPUT_NAME: x.numpy()})
        ours, theirs = _parts([t.numpy() for t in ours], raw_heads), _parts(theirs, raw_heads)
        if len(ours) != len(theirs):
            return float('inf')
        for a, b in zip(ours, theirs):
            difference = share_of_scale(a, b)
            if math.isnan(difference):  # max() would drop it
                return difference
            worst = max(worst, difference)
    return worst


def export_onnx(model, path, img_size, dynamic_batch=False, opset=None, raw_heads=False,
                max_difference=None, half=False):
    """Export `model` to `path` for square img_size inputs, check the file with
    onnxruntime against the model (at batch 1, and 2 when dynamic) and only then put it
    in place; returns the largest difference as a share of the output scale. A failed
    check raises OnnxCheckError and leaves no file. The model is traced on the CPU in
    eval mode and left in the mode it came in. `half`: weights and activations in fp16
    behind fp32 inputs and outputs (`_Half`), checked against the fp32 model within
    HALF_MAX_DIFFERENCE (onnxruntime's CPU provider runs fp16 graphs, though not faster
    than fp32: the file is for GPU runtimes). `max_difference` overrides the limit."""
    onnx, _ = require_onnx()
    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    training = model.training
    # on the CPU: a GPU's TF32 convolutions would fail a 1e-4 check for no fault of the graph
    subject = model if next(model.parameters()).device.type == 'cpu' else \
        copy.deepcopy(model).cpu()
    subject.eval()
    try:
        # the graph holds the fused model (one conv where there was conv + BN); the check
        # below holds it against the unfused one, so it covers the fusion too
        if max_difference is None:
            max_difference = HALF_MAX_DIFFERENCE if half else MAX_DIFFERENCE
        proto = onnx.load_from_string(_export_bytes(subject.fuse(), img_size, dynamic_batch,
                                                    opset, raw_heads, half))
        for key, value in _metadata(subject, img_size, raw_heads).items():
            proto.metadata_props.add(key=key, value=value)
        proto.metadata_props.add(key='precision', value='fp16' if half else 'fp32')
        onnx.checker.check_model(proto)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with atomic_output(path) as f:
            f.write(proto.SerializeToString())
            f.flush()
            difference = onnx_difference(f.name, subject, img_size,
                                         (1, 2) if dynamic_batch else (1,), raw_heads)
            if not difference <= max_difference:  # nan fails too
                raise OnnxCheckError(
                    f'{path}: onnxruntime differs from the PyTorch model by {difference:.2e} '
                    f'of the output scale (limit {max_difference:g}); nothing was written. '
                    'This is a bug: please report it with the cfg and --opset')
    finally:
        model.train(training)
    return difference


def onnx_latency(onnx_path, img_size, batch=1, runs=10, warmup=1, threads=None):
    """Median seconds of one onnxruntime CPU run of the file on a random (batch, C,
    img_size, img_size) input, after `warmup` runs. One process; `threads` intra-op
    threads (default torch.get_num_threads(), so the figure sits beside
    torch_utils.measure_latency's at the same count) and one inter-op thread."""
    session = ort_session(onnx_path, threads)
    shape = session.get_inputs()[0].shape  # [B, C, H, W], a name where dynamic
    if isinstance(shape[0], int) and shape[0] != batch:
        raise UserInputError(f'{onnx_path}: exported for batch {shape[0]} only; export it '
                             f'with --dynamic-batch to time batch {batch}')
    if any(isinstance(n, int) and n != img_size for n in shape[2:]):
        raise UserInputError(f'{onnx_path}: exported for {shape[3]}x{shape[2]} inputs, not '
                             f'{img_size}x{img_size}; export it again with --img-size {img_size}')
    x = np.random.default_rng(0).random((batch, shape[1], img_size, img_size), np.float32)
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def model_latency(model, img_size, runs=10, warmup=1, threads=None):
    """onnxruntime CPU latency (median seconds, batch 1) of `model`'s FP32 export at
    img_size, or None when onnx or onnxruntime is not installed: what the prune summary
    reports beside the PyTorch figure. The export is checked as export_onnx checks it and
    lives in a temporary folder only."""
    try:
        require_onnx()
    except UserInputError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'model.onnx')
        export_onnx(model, path, img_size)
        return onnx_latency(path, img_size, runs=runs, warmup=warmup, threads=threads)


def onnx_runner(model, img_size, path):
    """A zero-argument callable: one batch-1 onnxruntime CPU run of `model`'s FP32 export
    on a fixed random input, or None when onnx or onnxruntime is not installed. The file
    is written to `path` (checked as export_onnx checks it; the caller owns the folder).
    Its threads sleep between runs instead of spinning, so that sessions timed in turns
    (utils.torch_utils.interleaved_ratio) do not slow each other."""
    try:
        require_onnx()
    except UserInputError:
        return None
    export_onnx(model, path, img_size)
    session = ort_session(path, spinning=False)
    channels = session.get_inputs()[0].shape[1]
    x = np.random.default_rng(0).random((1, channels, img_size, img_size), np.float32)
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


# ---------------------------------------------------------------- evaluating a file

class OnnxModel(nn.Module):
    """An exported file (decoded outputs) that `evaluation.evaluate.evaluate` runs as it runs
    a Darknet model: called on a (B, C, S, S) tensor it gives the (B, N, 5+C) detections, through
    onnxruntime on the CPU. A file exported for batch 1 is run one image at a time.
    `img_size`, `stride` and `num_classes` come from the file's metadata."""

    def __init__(self, path, threads=None):
        super().__init__()
        if not os.path.isfile(path):
            raise UserInputError(f'{path}: ONNX file not found; check the --weights path')
        self.path = os.fspath(path)
        try:
            self.session = ort_session(path, threads)
        except Exception as e:  # onnxruntime raises its own exception types, one per cause
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserInputError(f'{path}: onnxruntime cannot load it ({first[:200]})') from None
        meta = self.session.get_modelmeta().custom_metadata_map
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs != ['detections'] or not {'img_size', 'classes', 'strides'} <= set(meta):
            raise UserInputError(f'{path}: not a decoded-detections export of export.py '
                                 f'(outputs {outputs}); export it again without --raw-heads')
        self.img_size, self.num_classes = int(meta['img_size']), int(meta['classes'])
        self.stride = int(max(json.loads(meta['strides'])))
        batch = self.session.get_inputs()[0].shape[0]
        self.batch = batch if isinstance(batch, int) else None
        self.hyperparams = {'width': self.img_size, 'height': self.img_size}
        # no weights live here; the empty buffer tells evaluate which device to use
        self.register_buffer('device_marker', torch.zeros(0), persistent=False)

    def _name(self):
        return self.path

    def forward(self, x):
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise UserInputError(f'{self.path}: exported for {self.img_size}x{self.img_size} '
                                 f'inputs, given {x.shape[3]}x{x.shape[2]}')
        images = x.detach().cpu().float().numpy()
        step = self.batch or len(images)
        parts = [self.session.run(None, {INPUT_NAME: images[k:k + step]})[0]
                 for k in range(0, len(images), step)]
        return torch.from_numpy(np.concatenate(parts)).to(x.device)


# ---------------------------------------------------------------- INT8

def _float_nodes(proto):
    """Names of the nodes kept in float: the first conv, each head conv and the [yolo]
    decode after it (the reshape of the head onwards). Boxes in pixels and scores in
    [0, 1] share one output tensor, which one 8-bit scale cannot hold, and 8-bit logits
    would move every box by exp(step); the head convs are a small share of the MACs. The
    first conv reads 3 channels, where int8 kernels gain nothing (on the pruned demo
    YOLOv3 it was the slowest int8 node), and keeping it float held mAP@0.5 within 0.4
    points of FP32 where quantising it lost 1.4."""
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in proto.graph.node for out in node.output}
    start = [node for node in proto.graph.node if node.op_type == 'Reshape'
             and getattr(producers.get(node.input[0]), 'op_type', None) == 'Conv']
    first = [node.name for node in proto.graph.node if node.op_type == 'Conv'
             and node.input[0] == proto.graph.input[0].name]
    seen, stack = {producers[node.input[0]].name for node in start} | set(first), start
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for out in node.output:
            stack += consumers.get(out, [])
    return sorted(seen)


# Quantised op types. Not Pad, Max and Slice: the Darknet maxpool pads with -inf, which
# no 8-bit range holds; they run in float between the quantised convs.
INT8_OPS = ['Conv', 'LeakyRelu', 'Add', 'Concat', 'Resize', 'MaxPool']
CALIBRATION_STEP = 2  # images per calibration slice (it must divide their count)


def quantize_int8(fp32_path, int8_path, images):
    """Statically quantised copy of an exported file: QDQ format, int8 per-channel conv
    weights, uint8 activations whose ranges come from running `images` (a list of
    (1, C, S, S) float32 arrays) through the FP32 graph (min/max). The first conv, the
    head convs and the decode stay float (`_float_nodes`). Written atomically."""
    onnx, _ = require_onnx()
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        """The images in slices: the calibrator keeps every tensor of the images it is
        given at once (about 0.5 GB per 416x416 image for YOLOv3), then folds them into
        its histograms; slices of CALIBRATION_STEP bound that."""

        def __init__(self):
            self.set_range(0, len(images))

        def __len__(self):
            return len(images)

        def set_range(self, start_index, end_index):
            self.feeds = iter([{INPUT_NAME: image} for image in images[start_index:end_index]])

        def get_next(self):
            return next(self.feeds, None)

    step = max(k for k in range(1, CALIBRATION_STEP + 1) if len(images) % k == 0)
    proto = onnx.load(fp32_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process: these graphs gain nothing
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, 'int8.onnx')
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
                q.quantize_static(fp32_path, out, Reader(), quant_format=q.QuantFormat.QDQ,
                                  per_channel=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8,
                                  calibrate_method=q.CalibrationMethod.MinMax,
                                  extra_options={'CalibStridedMinMax': step},
                                  op_types_to_quantize=INT8_OPS,
                                  nodes_to_exclude=_float_nodes(proto))
        finally:
            root.setLevel(level)
        quantized = onnx.load(out)
    for prop in proto.metadata_props:  # the evaluator reads the sizes from there
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    with atomic_output(int8_path) as f:
        f.write(quantized.SerializeToString())
    return int8_path


def load_model_or_onnx(cfg, weights, device):
    """The Darknet model of cfg + weights on `device`; or, for weights named .onnx, the
    exported file run by onnxruntime on the CPU (it needs no cfg)."""
    if weights and str(weights).endswith('.onnx'):
        return OnnxModel(weights)
    model = Darknet(cfg)
    if weights:
        load_weights(model, weights)
    return model.to(device)
