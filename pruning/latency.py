"""Latency as the price of a channel: a table of conv times measured on the target.

MACs are the wrong price where thin layers are memory-bound or a runtime has fast paths
for some widths (docs/speed.md). NetAdapt (Yang et al., ECCV 2018) and HALP (Shen et al.,
NeurIPS 2022) measure each layer on the device at a few widths and look the cost up; so
does this module:

1. `width_grid(model, mode)`: the input and output widths each conv takes when every
   prunable unit of `mode` keeps 100, 75, 50 and 25% of its channels (kept counts
   rounded up to multiples of ALIGN, as --round-to 8 rounds them);
2. a timer times each distinct conv (shape, widths, activation: the fused conv of the
   deployed model) once at every (input width, output width) pair of its grid:
   `OrtTimer` (onnxruntime CPU; one graph of many independent convs per session, per
   node times from its profiler) or `TorchTimer` (PyTorch on the CPU or a GPU, fp16 and
   channels_last there); and the whole model once, so that `rest` (what is not a conv:
   adds, routes, upsampling, the decode, layout reorders) is measured too;
3. `LatencyTable`, kept as JSON in CACHE_DIR under a key of the cfg's layers, mode, input
   size, batch, precision and the timer's device and versions (`latency_table`);
4. `predicted_latency(table, model, masks)`: each conv's time interpolated (bilinearly)
   at the widths the compact model would have, plus `rest`; `table.latency` is the
   original's measured latency, so `predicted / table.latency` is the share a
   --target-latency asks about;
5. `latency_costs(table, model, units, masks)`: per unit, (C,) milliseconds saved per
   channel removed, the shape `pruning.costs.channel_costs` gives, for ranking by score
   per millisecond.
"""
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from darknet.layers import ACTIVATIONS, ChannelValues, trace_channels
from deploy.onnx_export import export_onnx, onnx_latency, require_onnx
from pruning.graph import prunable_units
from utils.errors import UserInputError
from utils.fileio import atomic_write_text

FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # of each unit's channels, where the table is measured
ALIGN = 8                           # grid widths rounded up to multiples (--round-to 8)
CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         'runs', 'latency-cache')
TABLE_VERSION = 1
# one conv as the deployed (fused) model runs it: bias, then the activation
ConvSpec = namedtuple('ConvSpec', 'in_ch out_ch size stride pad groups height width act')


# ---------------------------------------------------------------- widths

def compact_widths(model, masks=None):
    """{conv layer: (input channels, output channels)} of the compact model `masks`
    (conv -> bool keep mask) would give, traced through the layers without building it:
    a channel survives a shortcut if either term does, routes concatenate and slice."""
    masks = masks or {}
    keep = ChannelValues(
        new=lambda i, layer: (masks[i].tolist() if i in masks else [True] * layer['filters']),
        cat=lambda parts: [k for part in parts for k in part],
        add=lambda a, b: [x or y for x, y in zip(a, b)],
        activate=lambda name, values: values)
    image = [True] * model.hyperparams.get('channels', 3)
    traced = trace_channels(model.module_defs, keep, image)
    return {i: (sum(traced[i - 1] if i else image), sum(traced[i]))
            for i, layer in enumerate(model.module_defs) if layer['type'] == 'convolutional'}


def _aligned(count, width, align=ALIGN):
    """`count` kept channels rounded up to a multiple of `align`, within 1..width."""
    if width >= align:
        count = -(-count // align) * align
    return int(min(width, max(1, count)))


def uniform_masks(model, units, fraction, align=ALIGN):
    """Masks keeping the first `fraction` (aligned) of every unit's channels."""
    masks = {}
    for unit in units:
        width = max(model.module_list[i].Conv2d.out_channels for i in unit)
        keep = torch.zeros(width, dtype=torch.bool)
        keep[:_aligned(math.ceil(fraction * width), width, align)] = True
        for i in unit:
            masks[i] = keep[:model.module_list[i].Conv2d.out_channels].clone()
    return masks


def width_grid(model, units, fractions=FRACTIONS, align=ALIGN):
    """{conv: (sorted input widths, sorted output widths)} over uniform cuts. Where
    alignment leaves a varying width one point (a unit of `align` channels or fewer), the
    smallest cut unaligned adds a second, so that width is interpolated, not scaled."""
    seen = {}
    for fraction in fractions:
        for conv, (c_in, c_out) in compact_widths(model, uniform_masks(model, units, fraction,
                                                                       align)).items():
            ins, outs = seen.setdefault(conv, (set(), set()))
            ins.add(c_in)
            outs.add(c_out)
    unaligned = compact_widths(model, uniform_masks(model, units, min(fractions), 1))
    for conv, (c_in, c_out) in unaligned.items():
        for widths, width in zip(seen[conv], (c_in, c_out)):
            if len(widths) == 1:
                widths.add(width)
    return {conv: (sorted(ins), sorted(outs)) for conv, (ins, outs) in seen.items()}


def conv_spec(model, conv, c_in, c_out, img_size):
    layer = model.module_defs[conv]
    size, stride = layer.get('size', 1), layer.get('stride', 1)
    pad = size // 2 if layer.get('pad', 0) else layer.get('padding', 0)
    side = int(round(img_size * stride / model.layer_strides[conv]))  # the input's side
    return ConvSpec(c_in, c_out, size, stride, pad, layer.get('groups', 1), side, side,
                    layer.get('activation', 'logistic'))


# ---------------------------------------------------------------- the table

@dataclass
class LatencyTable:
    """Measured seconds per conv on a grid of widths, and the rest of the model.
    `convs`: {conv: (input widths, output widths, seconds[in][out])}; `latency`: the whole
    original model, measured; `rest` = latency - the convs' sum at full width."""
    key: dict
    convs: dict
    latency: float
    rest: float = 0.0
    seconds_to_measure: float = 0.0
    notes: list = field(default_factory=list)

    def to_json(self):
        return json.dumps({'version': TABLE_VERSION, 'key': self.key, 'latency': self.latency,
                           'rest': self.rest, 'seconds_to_measure': self.seconds_to_measure,
                           'convs': {str(c): v for c, v in self.convs.items()}}, indent=1)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        convs = {int(c): (list(a), list(b), [list(r) for r in t])
                 for c, (a, b, t) in data['convs'].items()}
        return cls(data['key'], convs, data['latency'], data['rest'],
                   data.get('seconds_to_measure', 0.0))


def _interpolate(points, values, x):
    """Piecewise-linear in x through (points, values); outside, the nearest segment's line
    (clamped at 0); one point: proportional to x."""
    if len(points) == 1:
        return values[0] * x / points[0]
    k = int(np.clip(np.searchsorted(points, x) - 1, 0, len(points) - 2))
    x0, x1 = points[k], points[k + 1]
    return max(0.0, values[k] + (values[k + 1] - values[k]) * (x - x0) / (x1 - x0))


def conv_seconds(entry, c_in, c_out):
    """Bilinear interpolation of one conv's grid at (c_in, c_out)."""
    ins, outs, seconds = entry
    by_out = [_interpolate(outs, row, c_out) for row in seconds]
    return _interpolate(ins, by_out, c_in)


def predicted_latency(table, model, masks=None):
    """Seconds the compact model of `masks` (conv -> bool keep mask; None: the original)
    would take on the table's target: its convs from the table, plus `rest`."""
    widths = compact_widths(model, masks)
    return table.rest + sum(conv_seconds(table.convs[conv], *widths[conv])
                            for conv in table.convs)


def latency_costs(table, model, units, masks=None, step=0.25, align=ALIGN):
    """Per unit, (C,) milliseconds saved per channel removed (C its widest conv): the
    drop in `predicted_latency` when the unit alone loses `step` of its channels
    (aligned) from `masks` (None: the original), divided by the channels lost; the same
    for every channel of the unit. Savings at or below zero (a cut that buys nothing on
    this target) become 1e-3 of the median positive one, so that score / cost ranks
    those channels last instead of dividing by zero."""
    masks = {i: m.clone() for i, m in (masks or {}).items()}
    for unit in units:
        for i in unit:
            masks.setdefault(i, torch.ones(model.module_list[i].Conv2d.out_channels,
                                           dtype=torch.bool))
    base = predicted_latency(table, model, masks)
    saved = []
    for unit in units:
        widest = max(unit, key=lambda i: len(masks[i]))
        kept = masks[widest].nonzero().flatten()
        drop = min(len(kept) - 1, _aligned(math.ceil(step * len(masks[widest])),
                                           len(masks[widest]), align))
        if drop < 1:
            saved.append(0.0)
            continue
        trial = dict(masks)
        gone = kept[-drop:]
        for i in unit:
            trial[i] = masks[i].clone()
            trial[i][gone[gone < len(trial[i])]] = False
        saved.append((base - predicted_latency(table, model, trial)) * 1e3 / drop)
    positive = [s for s in saved if s > 0]
    floor = 1e-3 * float(np.median(positive)) if positive else 1e-9
    return [torch.full((len(masks[max(unit, key=lambda i: len(masks[i]))]),),
                       max(s, floor), dtype=torch.float32)
            for unit, s in zip(units, saved)]


# ---------------------------------------------------------------- timers

def _activation_nodes(helper, act, source, k):
    """ONNX nodes of a Darknet activation from `source`; (nodes, output name)."""
    out = f'y{k}'
    if act == 'linear':
        return [helper.make_node('Identity', [source], [out], name=f'act{k}')], out
    simple = {'leaky': ('LeakyRelu', {'alpha': 0.1}), 'relu': ('Relu', {}),
              'logistic': ('Sigmoid', {})}
    if act in simple:
        op, attributes = simple[act]
        return [helper.make_node(op, [source], [out], name=f'act{k}', **attributes)], out
    first = ('Sigmoid', []) if act == 'swish' else ('Softplus', [])
    nodes = [helper.make_node(first[0], [source], [f'a{k}_0'], name=f'act{k}_0')]
    if act == 'mish':
        nodes.append(helper.make_node('Tanh', [f'a{k}_0'], [f'a{k}_1'], name=f'act{k}_1'))
    gate = f'a{k}_1' if act == 'mish' else f'a{k}_0'
    nodes.append(helper.make_node('Mul', [source, gate], [out], name=f'act{k}_2'))
    return nodes, out


def conv_graph(specs, batch, seed=0):
    """One ONNX model holding each spec as an independent conv + activation, input `x<k>`,
    nodes named after k, so the profiler's per-node times say which spec they timed."""
    onnx, _ = require_onnx()
    helper, numpy_helper, FLOAT = onnx.helper, onnx.numpy_helper, onnx.TensorProto.FLOAT
    rng = np.random.default_rng(seed)
    nodes, weights, inputs, outputs = [], [], [], []
    for k, s in enumerate(specs):
        inputs.append(helper.make_tensor_value_info(f'x{k}', FLOAT,
                                                    [batch, s.in_ch, s.height, s.width]))
        shape = (s.out_ch, s.in_ch // s.groups, s.size, s.size)
        w = rng.standard_normal(shape).astype(np.float32) / math.sqrt(np.prod(shape[1:]))
        weights += [numpy_helper.from_array(w, f'w{k}'),
                    numpy_helper.from_array(np.zeros(s.out_ch, np.float32), f'b{k}')]
        nodes.append(helper.make_node('Conv', [f'x{k}', f'w{k}', f'b{k}'], [f'c{k}'],
                                      name=f'conv{k}', kernel_shape=[s.size] * 2,
                                      strides=[s.stride] * 2, pads=[s.pad] * 4, group=s.groups))
        act_nodes, out = _activation_nodes(helper, s.act, f'c{k}', k)
        nodes += act_nodes
        outputs.append(helper.make_tensor_value_info(out, FLOAT, None))
    graph = helper.make_graph(nodes, 'convs', inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def _spec_bytes(s, batch):
    side_out = (s.height + 2 * s.pad - s.size) // s.stride + 1
    return 4 * (batch * (s.in_ch * s.height * s.width + s.out_ch * side_out ** 2)
                + s.out_ch * s.in_ch // s.groups * s.size ** 2)


def _chunks(specs, batch, budget):
    chunk, size = [], 0
    for s in specs:
        if chunk and size + _spec_bytes(s, batch) > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(s)
        size += _spec_bytes(s, batch)
    if chunk:
        yield chunk


NODE_SPEC = re.compile(r'^(?:conv|act|[cya])(\d+)')


def profile_seconds(events, count):
    """Per spec k < count, the median over the profiled runs after the first of the
    summed kernel times of its nodes (onnxruntime names a fused conv after the conv node,
    an NCHWc one after its output; layout reorders belong to no spec)."""
    runs = sorted((e['ts'], e['ts'] + e['dur']) for e in events
                  if e.get('cat') == 'Session' and e.get('name') == 'model_run')
    starts = [start for start, _ in runs]
    totals = np.zeros((len(runs), count))
    for e in events:
        if e.get('cat') != 'Node' or not e['name'].endswith('_kernel_time'):
            continue
        match = NODE_SPEC.match(e['name'])
        if match and int(match.group(1)) < count:
            run = int(np.searchsorted(starts, e['ts'], side='right')) - 1
            totals[max(run, 0), int(match.group(1))] += e['dur'] / 1e6
    return [float(v) for v in np.median(totals[1:] if len(runs) > 1 else totals, 0)]


class OrtTimer:
    """onnxruntime on the CPU, fp32: convs timed by the profiler in graphs of many
    independent convs (one session per ~`budget` bytes of tensors), the whole model as
    its checked export (deploy.onnx_export)."""

    def __init__(self, batch=1, threads=None, repeats=5, budget=256e6):
        self.batch, self.repeats, self.budget = batch, repeats, budget
        self.threads = threads or torch.get_num_threads()

    def key(self):
        _, ort = require_onnx()
        return {'backend': 'onnxruntime', 'device': cpu_name(), 'threads': self.threads,
                'batch': self.batch, 'precision': 'fp32', 'version': ort.__version__}

    def time_convs(self, specs):
        _, ort = require_onnx()
        seconds = []
        with tempfile.TemporaryDirectory() as folder:
            for chunk in _chunks(specs, self.batch, self.budget):
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
                options.enable_profiling, options.log_severity_level = True, 3
                options.profile_file_prefix = os.path.join(folder, 'profile')
                session = ort.InferenceSession(conv_graph(chunk, self.batch).SerializeToString(),
                                               options, providers=['CPUExecutionProvider'])
                rng = np.random.default_rng(0)
                feed = {f'x{k}': rng.random((self.batch, s.in_ch, s.height, s.width), np.float32)
                        for k, s in enumerate(chunk)}
                for _ in range(self.repeats + 1):
                    session.run(None, feed)
                with open(session.end_profiling()) as f:
                    seconds += profile_seconds(json.load(f), len(chunk))
        return seconds

    def time_model(self, model, img_size):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, 'model.onnx')
            # timing only: the export's 1e-4 check is loosened to what would catch a wrong
            # graph, not the float rounding of a deep random-weight model
            export_onnx(model, path, img_size, dynamic_batch=self.batch > 1,
                        max_difference=1e-2)
            return onnx_latency(path, img_size, self.batch, runs=2 * self.repeats + 1,
                                threads=self.threads)


class TorchTimer:
    """PyTorch on `device` (CPU or CUDA) in `precision` ('fp32' or 'fp16'), optionally
    channels_last: each conv (fused: bias, then its activation) timed alone, on CUDA as
    `calls` back-to-back launches between two events divided by `calls` (the kernel time
    a CUDA graph replays, without the launch gaps); the whole model as
    `deploy.inference.prepare` runs it (CUDA-graph replay on CUDA)."""

    def __init__(self, device='cpu', batch=1, precision='fp32', channels_last=False,
                 repeats=5, calls=10):
        if precision not in ('fp32', 'fp16'):
            raise UserInputError(f'precision {precision}: choose fp32 or fp16')
        self.device = torch.device(device)
        self.batch, self.precision, self.channels_last = batch, precision, channels_last
        self.repeats, self.calls = repeats, calls if self.device.type == 'cuda' else 1
        self.dtype = torch.float16 if precision == 'fp16' else torch.float32
        self.format = torch.channels_last if channels_last else torch.contiguous_format

    def key(self):
        name = (torch.cuda.get_device_name(self.device) if self.device.type == 'cuda'
                else cpu_name())
        return {'backend': 'torch', 'device': name, 'threads': torch.get_num_threads(),
                'batch': self.batch, 'precision': self.precision,
                'channels_last': self.channels_last, 'version': torch.__version__}

    def _median(self, function, x):
        with torch.no_grad():
            function(x)
            times = []
            for _ in range(self.repeats):
                if self.device.type == 'cuda':
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    for _ in range(self.calls):
                        function(x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3 / self.calls)
                else:
                    begin = time.perf_counter()
                    function(x)
                    times.append(time.perf_counter() - begin)
        return sorted(times)[len(times) // 2]

    def time_convs(self, specs):
        seconds = []
        for s in specs:
            conv = nn.Sequential(nn.Conv2d(s.in_ch, s.out_ch, s.size, s.stride, s.pad,
                                           groups=s.groups),
                                 ACTIVATIONS[s.act].module() if ACTIVATIONS[s.act].module
                                 else nn.Identity())
            conv = conv.to(self.device, self.dtype).to(memory_format=self.format).eval()
            x = torch.rand(self.batch, s.in_ch, s.height, s.width, device=self.device,
                           dtype=self.dtype).contiguous(memory_format=self.format)
            seconds.append(self._median(conv, x))
        return seconds

    def time_model(self, model, img_size):
        from deploy.inference import prepare
        run = prepare(model, self.device, half=self.precision == 'fp16',
                      channels_last=self.channels_last, graph=self.device.type == 'cuda')
        x = torch.rand(self.batch, model.hyperparams.get('channels', 3), img_size, img_size,
                       device=self.device)
        calls, self.calls = self.calls, 1  # a replayed model is one launch already
        try:
            return self._median(run, x)
        finally:
            self.calls = calls


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if 'model name' in line)
    except (OSError, StopIteration):
        return platform.processor() or 'cpu'


def make_timer(device='cpu', batch=1, precision='fp32', backend=None, threads=None):
    """The timer for a target: onnxruntime on the CPU in fp32 when it is installed (the
    runtime docs/speed.md finds fastest there), else PyTorch on `device`."""
    device = torch.device(device)
    if backend is None:
        try:
            require_onnx()
            onnx_ok = True
        except UserInputError:
            onnx_ok = False
        backend = ('onnxruntime' if device.type == 'cpu' and precision == 'fp32' and onnx_ok
                   else 'torch')
    if backend == 'onnxruntime':
        if device.type != 'cpu' or precision != 'fp32':
            raise UserInputError(f'latency on onnxruntime is measured on the CPU in fp32, not '
                                 f'{device.type} {precision}; use the torch backend')
        return OrtTimer(batch, threads)
    if backend != 'torch':
        raise UserInputError(f'latency backend {backend}: choose onnxruntime or torch')
    return TorchTimer(device, batch, precision, channels_last=device.type == 'cuda')


# ---------------------------------------------------------------- measuring, caching

def layers_digest(model):
    """A hash of what the timing depends on in the model: its layers and input channels."""
    text = json.dumps([model.hyperparams.get('channels', 3), model.module_defs],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def measure_table(model, units, img_size, timer, fractions=FRACTIONS, align=ALIGN, key=None):
    """A fresh LatencyTable: every distinct conv of the grid timed once, then the model."""
    start = time.perf_counter()
    grid = width_grid(model, units, fractions, align)
    specs = {conv: [[conv_spec(model, conv, a, b, img_size) for b in outs] for a in ins]
             for conv, (ins, outs) in grid.items()}
    unique = sorted({s for rows in specs.values() for row in rows for s in row})
    seconds = dict(zip(unique, timer.time_convs(unique)))
    convs = {conv: (grid[conv][0], grid[conv][1], [[seconds[s] for s in row] for row in rows])
             for conv, rows in specs.items()}
    latency = timer.time_model(model, img_size)
    full = sum(conv_seconds(entry, entry[0][-1], entry[1][-1]) for entry in convs.values())
    return LatencyTable(key or {}, convs, latency, latency - full,
                        time.perf_counter() - start)


def latency_table(model, mode, img_size, timer=None, cache_dir=CACHE_DIR, refresh=False,
                  fractions=FRACTIONS, align=ALIGN):
    """The LatencyTable of `model`'s convs under `mode`'s units at img_size on the
    `timer`'s target (default `make_timer()`: onnxruntime CPU fp32, batch 1), read from
    `cache_dir` when a table of the same key is there (cfg layers, mode, size, widths
    grid, and the timer's backend, device, threads, batch, precision and version), else
    measured and written there (None: no cache). `refresh` measures again."""
    timer = timer or make_timer()
    _, units, _ = prunable_units(model, mode)
    key = {'layers': layers_digest(model), 'mode': mode, 'img_size': img_size,
           'fractions': list(fractions), 'align': align, **timer.key()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f'{name}.json') if cache_dir else None
    if path and not refresh and os.path.isfile(path):
        try:
            with open(path) as f:
                table = LatencyTable.from_json(f.read())
            if table.key == key:
                return table
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again and replaced
    table = measure_table(model, units, img_size, timer, fractions, align, key)
    if path:
        atomic_write_text(path, table.to_json())
    return table
