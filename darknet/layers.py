"""Darknet layer types: what each [section] of a cfg means, in one place.

One class per supported layer type (`...Type`, next to the nn.Module it builds),
registered in LAYER_TYPES. Every other module asks it instead of branching on a
layer's type:
- the cfg parser (darknet/cfg.py): the `keys` a type accepts and their kinds,
  the values it cannot build (`unsupported`), and `check(layers, i, where)` on the
  typed cfg before any shape is known;
- the model builder (models.Darknet): `build(...)` gives the nn.Module and its output
  Shape from its input shapes; `sources(i, layer)` the earlier layers it reads;
- pruning (pruning/graph.py, pruning/surgery.py): `channels(...)` says how each output channel derives
  from input channels, for any per-channel values (`ChannelValues`: the conv channels
  an output channel is made of, or the constant a pruned channel outputs), and
  `note(...)` records what the prune modes must know (BN convs, shortcut ties, ...);
- layer removal (pruning/layer_prune.py): `refs`, the key that holds layer indices.
Adding a layer type is one class here plus its tests.
"""
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserInputError

# the kinds of cfg values (darknet/cfg.py parses and writes them)
INT, FLOAT, INTS, FLOATS, STR = 'int', 'float', 'int list', 'float list', 'string'

LEAKY_SLOPE = 0.1
# Darknet divides by sqrt(var) + 1e-6 and OpenCV by sqrt(var + 1e-6); with eps inside
# the root, as PyTorch puts it, 1e-6 stays closest to both for small variances.
BN_EPS = 1e-6
BN_MOMENTUM = 0.03


@dataclass(frozen=True)
class Activation:
    module: Callable    # () -> nn.Module, or None for linear
    function: Callable  # tensor -> tensor


ACTIVATIONS = {
    'leaky': Activation(lambda: nn.LeakyReLU(LEAKY_SLOPE), lambda x: F.leaky_relu(x, LEAKY_SLOPE)),
    'mish': Activation(nn.Mish, F.mish),
    'swish': Activation(nn.SiLU, F.silu),
    'logistic': Activation(nn.Sigmoid, torch.sigmoid),
    'relu': Activation(nn.ReLU, F.relu),
    'linear': Activation(None, lambda x: x),
}


def activation_module(name):
    make = ACTIVATIONS[name].module
    return make() if make else nn.Identity()


def resolve_refs(index, refs):
    """Absolute layer indices of route `layers` / shortcut `from` at layer `index`."""
    return [r if r >= 0 else index + r for r in refs]


@dataclass(frozen=True)
class Shape:
    channels: int
    scale: Fraction     # input pixels per output pixel


@dataclass(frozen=True)
class ChannelValues:
    """An algebra of per-channel values that `LayerType.channels` maps through a layer."""
    new: Callable       # (i, layer) -> the values of a conv's fresh output channels
    cat: Callable       # [values, ...] -> their concatenation
    add: Callable       # (a, b) of one length -> their channel-wise sum
    activate: Callable  # (activation name, values) -> values after it


INPUT = -1  # origin "layer" of the image channels


def origin_convs(channel_origins):
    """The conv layers a list of origin sets (of (conv, channel) pairs) draws on."""
    return {layer for origin in channel_origins for layer, _ in origin if layer != INPUT}


# ---------------------------------------------------------------- the layer types

class LayerType:
    """Defaults: no references, channels and size pass through unchanged."""
    name = None
    aliases = ()
    keys = {}
    unsupported = {}    # key -> (the only value built, why)
    refs = None         # the key holding earlier layer indices
    reads_previous = True  # takes the previous layer's output as its input

    def sources(self, i, layer):
        return resolve_refs(i, layer[self.refs]) if self.refs else []

    def check(self, layers, i, where):
        if self.refs is None:
            return
        if self.refs not in layers[i]:
            raise UserInputError(f"{where(i)}: [{self.name}] needs '{self.refs}='")
        refs = layers[i][self.refs]
        for ref, target in zip(refs, resolve_refs(i, refs)):
            if not 0 <= target < i:
                raise UserInputError(
                    f'{where(i)}: [{self.name}] {self.refs}={ref} points to layer {target}, '
                    f'outside layers 0..{i - 1} before it; fix the reference')

    def build(self, i, layer, previous, shapes, where):
        """(module, output Shape); `previous` is the input Shape, `shapes` every earlier
        layer's. Refuses what cannot be built with `where(i)` in the message."""
        raise NotImplementedError

    def channels(self, i, layer, previous, sources, values):
        """The layer's output channels as `values` (ChannelValues) of its inputs:
        `previous` the previous layer's, `sources` those of the layers it references."""
        return previous

    def note(self, info, i, layer, previous, out, traced):
        """Record in `info` (pruning.graph.GraphInfo) what pruning must know; `traced` holds
        every layer's origins so far."""


def _same_strides(layer, stride, where):
    if layer.get('stride_x', stride) != stride or layer.get('stride_y', stride) != stride:
        raise UserInputError(f'{where}: different stride_x/stride_y are not supported; '
                             'use stride=')


class ConvolutionalType(LayerType):
    name, aliases = 'convolutional', ('conv',)
    keys = {
        'batch_normalize': INT, 'filters': INT, 'size': INT, 'stride': INT,
        'pad': INT, 'padding': INT, 'groups': INT, 'activation': STR,
        'dilation': INT, 'stride_x': INT, 'stride_y': INT, 'flipped': INT,
        'binary': INT, 'xnor': INT, 'bin_output': INT, 'antialiasing': INT,
        'share_index': INT, 'dot': FLOAT, 'assisted_excitation': FLOAT,
        'sway': INT, 'rotate': INT, 'stretch': INT, 'stretch_sway': INT,
        'coordconv': INT, 'deform': INT,
    }
    unsupported = {
        'dilation': (1, 'dilated convolutions are not supported'),
        'flipped': (0, 'flipped weights are not supported'),
        'binary': (0, 'binary weights are not supported'),
        'xnor': (0, 'XNOR convolutions are not supported'),
        'antialiasing': (0, 'anti-aliased strides are not supported'),
        'share_index': (None, 'weight sharing is not supported'),
        'assisted_excitation': (0, 'assisted excitation is not supported'),
        'coordconv': (0, 'coordconv is not supported'),
        'deform': (0, 'deformable convolutions are not supported'),
    }

    def check(self, layers, i, where):
        if 'filters' not in layers[i]:
            raise UserInputError(f"{where(i)}: [convolutional] needs 'filters='")

    def build(self, i, layer, previous, shapes, where):
        groups, filters = layer.get('groups', 1), layer['filters']
        stride = layer.get('stride', 1)
        _same_strides(layer, stride, where(i))
        if filters < 1 or layer.get('size', 1) < 1 or stride < 1 or groups < 1:
            raise UserInputError(f'{where(i)}: filters, size, stride and groups must be positive')
        if previous.channels % groups or filters % groups:
            raise UserInputError(f'{where(i)}: groups={groups} must divide both the '
                                 f'{previous.channels} input channels and filters={filters}')
        return conv_block(layer, previous.channels), Shape(filters, previous.scale * stride)

    def channels(self, i, layer, previous, sources, values):
        return values.new(i, layer)

    def note(self, info, i, layer, previous, out, traced):
        if layer.get('batch_normalize', 0):
            info.bn_convs.append(i)
        if layer.get('groups', 1) > 1:  # a cut input channel would shift the groups
            info.unfoldable |= origin_convs(previous) | {i}
        if layer.get('activation', 'logistic') == 'logistic':  # act(0) is not 0
            info.unfoldable.add(i)


def conv_block(layer, in_channels):
    """Conv2d [+ BatchNorm2d] [+ activation], named as the ultralytics-era checkpoints are."""
    size = layer.get('size', 1)
    padding = size // 2 if layer.get('pad', 0) else layer.get('padding', 0)
    block = nn.Sequential()
    block.add_module('Conv2d', nn.Conv2d(in_channels, layer['filters'], size,
                                         stride=layer.get('stride', 1), padding=padding,
                                         groups=layer.get('groups', 1),
                                         bias=not layer.get('batch_normalize', 0)))
    if layer.get('batch_normalize', 0):
        block.add_module('BatchNorm2d', nn.BatchNorm2d(layer['filters'], eps=BN_EPS,
                                                       momentum=BN_MOMENTUM))
    make = ACTIVATIONS[layer.get('activation', 'logistic')].module
    if make is not None:
        block.add_module('activation', make())
    return block


class MaxpoolType(LayerType):
    name, aliases = 'maxpool', ('max',)
    keys = {'size': INT, 'stride': INT, 'padding': INT, 'stride_x': INT, 'stride_y': INT,
            'maxpool_depth': INT, 'out_channels': INT, 'antialiasing': INT}
    unsupported = {'maxpool_depth': (0, 'channel-wise max pooling is not supported'),
                   'antialiasing': (0, 'anti-aliased pooling is not supported')}

    def build(self, i, layer, previous, shapes, where):
        stride = layer.get('stride', 1)
        size = layer.get('size', stride)
        _same_strides(layer, stride, where(i))
        padding = layer.get('padding', size - 1)
        if size < 1 or stride < 1 or padding < 0:
            raise UserInputError(f'{where(i)}: size and stride must be positive and padding '
                                 'not negative')
        return MaxPool(size, stride, padding), Shape(previous.channels, previous.scale * stride)


class MaxPool(nn.Module):
    """Darknet max pooling: `padding` (default size - 1) split low/high, padded with -inf."""

    def __init__(self, size, stride, padding):
        super().__init__()
        self.size, self.stride, self.padding = size, stride, padding

    def forward(self, x):
        low = self.padding // 2
        pads = []
        for n in (x.shape[3], x.shape[2]):  # F.pad wants the last dimension first
            out = (n + self.padding - self.size) // self.stride + 1
            pads += [low, max((out - 1) * self.stride + self.size - n - low, 0)]
        if any(pads):
            x = F.pad(x, pads, value=float('-inf'))
        if self.stride > 1:
            return F.max_pool2d(x, self.size, self.stride)
        # stride 1 (tiny models' size 2, SPP's 5/9/13): a running max along rows, then
        # columns, is the same and many times faster than max_pool2d on the CPU
        for dim in (2, 3):
            n = x.shape[dim] - self.size + 1
            out = x.narrow(dim, 0, n)
            for shift in range(1, self.size):
                out = torch.maximum(out, x.narrow(dim, shift, n))
            x = out
        return x


class UpsampleType(LayerType):
    name = 'upsample'
    keys = {'stride': INT, 'scale': FLOAT}
    unsupported = {'scale': (1.0, 'scaled upsampling is not supported')}

    def build(self, i, layer, previous, shapes, where):
        stride = layer.get('stride', 2)
        if stride < 1:
            raise UserInputError(f'{where(i)}: stride={stride}: only upsampling by a positive '
                                 'whole factor is supported')
        return (nn.Upsample(scale_factor=stride, mode='nearest'),
                Shape(previous.channels, previous.scale / stride))

    def note(self, info, i, layer, previous, out, traced):
        # nearest upsampling repeats border pixels, so a constant folded on the
        # zero-padded border of a later conv would no longer be exact there
        info.upsample_feeders |= origin_convs(previous)


def group_slice(channels, groups, group_id):
    """The channel range a `groups`/`group_id` route takes of a `channels`-wide input."""
    size = channels // groups
    return slice(group_id * size, (group_id + 1) * size)


class RouteType(LayerType):
    name, refs, reads_previous = 'route', 'layers', False
    keys = {'layers': INTS, 'groups': INT, 'group_id': INT, 'stopbackward': INT}

    def build(self, i, layer, previous, shapes, where):
        sources = self.sources(i, layer)
        groups, group_id = layer.get('groups', 1), layer.get('group_id', 0)
        if groups < 1 or not 0 <= group_id < groups:
            raise UserInputError(f'{where(i)}: needs groups >= 1 and 0 <= group_id < groups '
                                 f'(got groups={groups}, group_id={group_id})')
        widths = [shapes[s].channels for s in sources]
        if any(w % groups for w in widths):
            raise UserInputError(f'{where(i)}: groups={groups} does not divide the channels '
                                 f'{widths} of layers {sources}')
        if len({shapes[s].scale for s in sources}) > 1:
            raise UserInputError(f'{where(i)}: layers {sources} have different spatial sizes '
                                 'and cannot be concatenated; fix layers=')
        return (Route(groups, group_id),
                Shape(sum(w // groups for w in widths), shapes[sources[0]].scale))

    def channels(self, i, layer, previous, sources, values):
        groups, group_id = layer.get('groups', 1), layer.get('group_id', 0)
        return values.cat([s[group_slice(len(s), groups, group_id)] for s in sources])

    def note(self, info, i, layer, previous, out, traced):
        if layer.get('groups', 1) > 1:
            for source in self.sources(i, layer):
                info.sliced_convs |= origin_convs(traced[source])


class Route(nn.Module):
    """Concatenate earlier outputs along channels; with groups, one slice of each first."""

    def __init__(self, groups=1, group_id=0):
        super().__init__()
        self.groups, self.group_id = groups, group_id

    def forward(self, inputs):
        parts = [p[:, group_slice(p.shape[1], self.groups, self.group_id)] for p in inputs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class ShortcutType(LayerType):
    """Adds an earlier layer's output to the previous one. Where their widths differ,
    Darknet adds over the smaller count and keeps the previous layer's width (Partial
    Residual Networks: yolov3-tiny-prn.cfg); OpenCV's importer does the same."""
    name, refs = 'shortcut', 'from'
    keys = {'from': INTS, 'activation': STR, 'weights_type': STR,
            'weights_normalization': STR, 'stopbackward': INT}
    unsupported = {'weights_type': ('none', 'weighted shortcuts are not supported')}

    def check(self, layers, i, where):
        super().check(layers, i, where)
        if len(layers[i]['from']) != 1:
            raise UserInputError(f'{where(i)}: [shortcut] with several from= layers is not '
                                 'supported; use one')

    def build(self, i, layer, previous, shapes, where):
        source = self.sources(i, layer)[0]
        if shapes[source].scale != previous.scale:
            raise UserInputError(
                f'{where(i)}: adds layer {source} to layer {i - 1}, whose outputs differ in '
                'spatial size; fix from= or the strides of the layers between')
        return Shortcut(layer.get('activation', 'linear')), previous

    def channels(self, i, layer, previous, sources, values):
        other = sources[0]
        summed = min(len(previous), len(other))
        out = values.add(previous[:summed], other[:summed])
        if summed < len(previous):
            out = values.cat([out, previous[summed:]])
        return values.activate(layer.get('activation', 'linear'), out)

    def note(self, info, i, layer, previous, out, traced):
        other = traced[self.sources(i, layer)[0]]
        summed = out[:min(len(previous), len(other))]
        info.ties += [origin_convs([o]) for o in summed]
        # one mask per group works only where every summed channel k is channel k of
        # each conv in it (a route before the sum would shift the positions)
        info.unaligned |= {conv for k, o in enumerate(summed) for conv, c in o
                           if c != k and conv != INPUT}
        if layer.get('activation', 'linear') == 'logistic':
            info.unfoldable |= origin_convs(out)
        info.has_shortcut = True


class Shortcut(nn.Module):
    """Residual sum of the previous output and an earlier one, then an activation."""

    def __init__(self, activation):
        super().__init__()
        self.activation = activation_module(activation)

    def forward(self, x, inputs):
        other = inputs[0]
        summed = min(x.shape[1], other.shape[1])
        if summed == x.shape[1]:
            total = x + other[:, :summed]
        else:  # partial residual: the previous layer's remaining channels pass as they are
            total = torch.cat((x[:, :summed] + other, x[:, summed:]), 1)
        return self.activation(total)


class YoloType(LayerType):
    name = 'yolo'
    keys = {
        'mask': INTS, 'anchors': FLOATS, 'classes': INT, 'num': INT,
        'jitter': FLOAT, 'ignore_thresh': FLOAT, 'truth_thresh': FLOAT,
        'random': FLOAT, 'scale_x_y': FLOAT, 'iou_normalizer': FLOAT,
        'cls_normalizer': FLOAT, 'obj_normalizer': FLOAT, 'iou_loss': STR,
        'iou_thresh': FLOAT, 'iou_thresh_kind': STR, 'nms_kind': STR,
        'beta_nms': FLOAT, 'max_delta': FLOAT, 'counters_per_class': INTS,
        'label_smooth_eps': FLOAT, 'resize': FLOAT, 'new_coords': INT,
        'objectness_smooth': INT, 'focal_loss': INT, 'track_history_size': INT,
        'sim_thresh': FLOAT, 'dets_for_track': INT, 'dets_for_show': INT,
        'track_ciou_norm': FLOAT, 'embedding_layer': INT, 'max': INT,
        'map': STR, 'show_details': INT,
    }
    unsupported = {'new_coords': (0, 'new_coords=1 decoding is not supported')}

    def check(self, layers, i, where):
        layer = layers[i]
        for key in ('mask', 'anchors', 'classes'):
            if key not in layer:
                raise UserInputError(f"{where(i)}: [yolo] needs '{key}='")
        n_anchors = len(layer['anchors']) // 2
        if len(layer['anchors']) % 2:
            raise UserInputError(f'{where(i)}: [yolo] anchors has an odd count of numbers; '
                                 'give width,height pairs')
        if not all(0 <= m < n_anchors for m in layer['mask']):
            raise UserInputError(f'{where(i)}: [yolo] mask={layer["mask"]} refers to anchors '
                                 f'beyond the {n_anchors} given')
        expected = len(layer['mask']) * (5 + layer['classes'])
        before = layers[i - 1] if i > 0 else None
        if before and before['type'] == 'convolutional' and before['filters'] != expected:
            raise UserInputError(
                f'{where(i - 1)}: the conv before this [yolo] has filters={before["filters"]}, '
                f'but {len(layer["mask"])} anchors x (5 + {layer["classes"]} classes) needs '
                f'filters={expected}; set filters={expected}')

    def build(self, i, layer, previous, shapes, where):
        expected = len(layer['mask']) * (5 + layer['classes'])
        if previous.channels != expected:
            raise UserInputError(f'{where(i)}: receives {previous.channels} channels, but '
                                 f'{len(layer["mask"])} anchors x (5 + {layer["classes"]} '
                                 f'classes) need {expected}')
        anchors = layer['anchors']
        pairs = [(anchors[2 * m], anchors[2 * m + 1]) for m in layer['mask']]
        return YOLOLayer(pairs, layer['classes'], layer.get('scale_x_y', 1.0)), previous


def decode_boxes(raw, grid, stride, scale_x_y, anchors, max_log_wh=None):
    """Raw (..., 4) tx, ty, tw, th at cells `grid` (..., 2) x, y -> (..., 4) cx, cy, w,
    h in input pixels; `stride` is the head's (x, y) pixels per cell, `anchors` (..., 2)
    in pixels. `max_log_wh` caps tw, th (the loss's guard against inf widths)."""
    s = scale_x_y
    xy = (torch.sigmoid(raw[..., :2]) * s - (s - 1) / 2 + grid) * stride
    twh = raw[..., 2:4] if max_log_wh is None else raw[..., 2:4].clamp(max=max_log_wh)
    return torch.cat((xy, torch.exp(twh) * anchors), -1)


class YOLOLayer(nn.Module):
    """Decodes one head: raw (B, A*(5+C), H, W) -> boxes in input pixels.

    The forward does no host work once it has seen an input size: the cell grid, the
    strides and the anchors it decodes with are non-persistent buffers (never in a
    state dict or a .pt file), built on the first forward at each (size, dtype, device)
    and then reused, and no tensor is made from Python data. So a CUDA graph can capture
    the decoded forward after one warm-up pass, and torch.compile needs no graph break
    (tests/test_capture_safe.py)."""

    def __init__(self, anchors, num_classes, scale_x_y=1.0):
        super().__init__()
        # not persistent: the cfg is the one source of anchors, a checkpoint never overrides it
        self.register_buffer('anchors', torch.tensor(anchors, dtype=torch.float32).view(-1, 2),
                             persistent=False)
        self.num_anchors, self.num_classes = len(anchors), num_classes
        self.num_outputs = num_classes + 5
        self.scale_x_y = scale_x_y
        self.stride = None  # (x, y) in input pixels per cell, set by each forward
        # the decode constants of the last input size (see _decode_constants)
        for name in ('grid', 'cell_stride', 'anchor_wh'):
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self._decode_key = None

    def _decode_constants(self, ny, nx, p):
        """(grid (H, W, 2) x, y; stride (2,) x, y; anchors (A, 2)) in p's dtype and
        device. Built only when the size, dtype or device changes: a branch on shapes,
        never on values. None is over 3-D, so `model.to(memory_format=torch.channels_last)`
        (which converts 4-D and refuses 5-D buffers) leaves them be."""
        key = (ny, nx, self.stride, p.dtype, p.device)
        if key != self._decode_key:
            gy, gx = torch.meshgrid(torch.arange(ny, device=p.device),
                                    torch.arange(nx, device=p.device), indexing='ij')
            self.grid = torch.stack((gx, gy), -1).to(p.dtype)
            self.cell_stride = torch.tensor(self.stride, dtype=p.dtype, device=p.device)
            self.anchor_wh = self.anchors.to(p.device, p.dtype)
            self._decode_key = key
        return self.grid, self.cell_stride, self.anchor_wh

    def forward(self, p, img_size, raw=False):
        batch, _, ny, nx = p.shape
        self.stride = (img_size[1] / nx, img_size[0] / ny)
        # (B, A*(5+C), H, W) -> (B, A, H, W, 5+C)
        p = p.view(batch, self.num_anchors, self.num_outputs, ny, nx).permute(0, 1, 3, 4, 2)
        if self.training or raw:
            return p.contiguous()
        grid, stride, anchors = self._decode_constants(ny, nx, p)
        boxes = decode_boxes(p[..., :4], grid, stride, self.scale_x_y,
                             anchors.view(1, -1, 1, 1, 2))
        decoded = torch.cat((boxes, torch.sigmoid(p[..., 4:])), -1)
        return decoded.view(batch, -1, self.num_outputs)


LAYER_TYPES = {t.name: t for t in (ConvolutionalType(), MaxpoolType(), UpsampleType(),
                                   RouteType(), ShortcutType(), YoloType())}
SECTION_ALIASES = {alias: t.name for t in LAYER_TYPES.values() for alias in (t.name, *t.aliases)}


def layer_type(layer):
    return LAYER_TYPES[layer['type']]


def trace_channels(layers, values, input_values, visit=None):
    """Map per-channel values (ChannelValues) through every layer, starting from the
    image channels' `input_values`: per layer, its output channels' values.
    `visit(i, layer, previous, out, traced)` sees each layer once its output is known."""
    traced, previous = [], input_values
    for i, layer in enumerate(layers):
        kind = layer_type(layer)
        out = kind.channels(i, layer, previous, [traced[s] for s in kind.sources(i, layer)],
                            values)
        traced.append(out)
        if visit:
            visit(i, layer, previous, out, traced)
        previous = out
    return traced
