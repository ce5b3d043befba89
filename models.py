"""The Darknet model: build from a cfg, run it as Darknet does, read and write weights.

    python -c "from models import Darknet; print(Darknet('cfg/yolov3-tiny.cfg'))"

Layout, top-down: the `Darknet` model that wires the layer modules (each layer type's
module and checks are in utils/layers.py) from the typed cfg layers, then weights I/O: Darknet
`.weights` (byte-exact, size-checked against the cfg) and PyTorch `.pt` checkpoints, and
transfer learning (`transfer_weights`: the convs of another cfg's file that fit).
"""
import copy
import math
import os
import pickle
import struct
import warnings
import zipfile
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn

from utils.errors import UserInputError
from utils.fileio import atomic_output, refuse_overwrite
from utils.layers import Shape, YOLOLayer, layer_type
from utils.parse_config import check_layers, parse_model_cfg


class Darknet(nn.Module):
    """A Darknet detector built from a cfg path, a (hyperparams, layers) pair or layers.

    Eval mode: `model(x)` -> (B, N, 5+C) decoded predictions, heads in cfg order, each in
    (anchor, row, col) order. Train mode, or `model(x, raw=True)`: the list of raw heads,
    (B, A, H, W, 5+C) each.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg_path = cfg if isinstance(cfg, (str, os.PathLike)) else None
        if self.cfg_path is not None:
            hyperparams, layers = parse_model_cfg(cfg)
        elif isinstance(cfg, tuple):
            hyperparams, layers = cfg
            check_layers(layers)
        else:
            hyperparams, layers = {}, cfg
            check_layers(layers)
        self.hyperparams, self.module_defs = hyperparams, layers
        self.module_list, self.out_channels, scales = self._build()
        # per layer, the earlier layers whose outputs it reads (route, shortcut)
        self.sources = [layer_type(layer).sources(i, layer)
                        for i, layer in enumerate(self.module_defs)]
        self.saved = set().union(*self.sources)  # outputs kept for a later reader
        self.yolo_layers = [m for m in self.module_list if isinstance(m, YOLOLayer)]
        if not self.yolo_layers:
            raise UserInputError(f'{self._name()}: the cfg has no [yolo] layer')
        self.layer_strides = [float(s) for s in scales]  # input pixels per output pixel
        self.stride = math.lcm(*(s.numerator for s in scales))
        self.seen = 0  # images seen in training, kept in the .weights header

    def _name(self):
        return self.cfg_path or 'cfg'

    def _where(self, i):
        return f'{self._name()}: layer {i} [{self.module_defs[i]["type"]}]'

    def _build(self):
        """Modules, output channels and input/output size ratio of every layer."""
        modules, shapes = nn.ModuleList(), []
        shape = Shape(self.hyperparams.get('channels', 3), Fraction(1))
        if shape.channels < 1:
            raise UserInputError(f'{self._name()}: [net] channels={shape.channels}: an input '
                                 'needs at least one channel (3 for colour images)')
        for i, layer in enumerate(self.module_defs):
            module, shape = layer_type(layer).build(i, layer, shape, shapes, self._where)
            modules.append(module)
            shapes.append(shape)
        return modules, [s.channels for s in shapes], [s.scale for s in shapes]

    def _same_sizes(self, i, tensors, sources):
        """Concatenated or added outputs need one spatial size; a conv or pool whose
        padding shrinks its output (no pad=1) breaks that only at run time."""
        if torch.jit.is_tracing():  # sizes are traced tensors there; the eager run checks
            return
        sizes = [tuple(t.shape[2:]) for t in tensors]
        if len(set(sizes)) > 1:
            found = ', '.join(f'layer {s}: {w}x{h}' for s, (h, w) in zip(sources, sizes))
            raise UserInputError(f'{self._where(i)}: its inputs differ in size ({found}); '
                                 'check pad=/padding= of the layers before it')

    @property
    def num_classes(self):
        return self.yolo_layers[0].num_classes

    def forward(self, x, raw=False):
        """`raw=True` returns the raw heads in eval mode too (BN on running statistics):
        what a distillation teacher gives."""
        height, width = x.shape[-2:]
        if height % self.stride or width % self.stride:
            raise UserInputError(f'input size {width}x{height}: both sides must be multiples '
                                 f'of {self.stride}, the largest stride of {self._name()}')
        outputs, heads = {}, []
        for i, module in enumerate(self.module_list):
            sources = self.sources[i]
            if isinstance(module, YOLOLayer):
                heads.append(module(x, (height, width), raw))
            elif not sources:
                x = module(x)
            elif layer_type(self.module_defs[i]).reads_previous:  # shortcut
                inputs = [outputs[s] for s in sources]
                self._same_sizes(i, [x] + inputs, [i - 1] + sources)
                x = module(x, inputs)
            else:  # route
                inputs = [outputs[s] for s in sources]
                self._same_sizes(i, inputs, sources)
                x = module(inputs)
            if i in self.saved:
                outputs[i] = x
        return heads if self.training or raw else torch.cat(heads, 1)

    def fuse(self):
        """An inference-ready copy in eval mode: each BatchNorm folded into its conv, so
        conv(x) * s + t becomes one conv with weight W * s and bias t (s = gamma /
        sqrt(running_var + eps), t = beta - running_mean * s). The copy's layers read
        batch_normalize=0, so it saves as the BN-free Darknet model it is; `self` is
        left as it was (training never sees a fused model). Folded in float64: the
        product is rounded once."""
        fused = copy.deepcopy(self).eval()
        fused.module_defs = copy.deepcopy(self.module_defs)
        for i, layer in enumerate(fused.module_defs):
            block = fused.module_list[i]
            if layer['type'] != 'convolutional' or not hasattr(block, 'BatchNorm2d'):
                continue
            conv, bn = block.Conv2d, block.BatchNorm2d
            with torch.no_grad():
                scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
                shift = bn.bias.double() - bn.running_mean.double() * scale
                merged = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                   conv.stride, conv.padding, conv.dilation, conv.groups,
                                   bias=True).to(conv.weight.device, conv.weight.dtype)
                merged.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
                merged.bias.copy_(shift)
            block.Conv2d = merged  # same name, same position in the Sequential
            del block.BatchNorm2d
            layer['batch_normalize'] = 0
        return fused


# ---------------------------------------------------------------- weights I/O

def conv_layers(model, cutoff=None):
    """(index, conv block) of every convolutional layer before `cutoff`, in cfg order."""
    stop = len(model.module_defs) if cutoff is None else cutoff
    return [(i, model.module_list[i]) for i, layer in enumerate(model.module_defs[:stop])
            if layer['type'] == 'convolutional']


def darknet_tensors(block):
    """A conv block's tensors in .weights order."""
    conv = block.Conv2d
    if hasattr(block, 'BatchNorm2d'):
        bn = block.BatchNorm2d
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    return [conv.bias, conv.weight]


def darknet_float_count(model, cutoff=None):
    return sum(t.numel() for _, block in conv_layers(model, cutoff)
               for t in darknet_tensors(block))


def _read_header(path):
    """(version tuple, seen, header size in bytes); refuses what is no Darknet header."""
    size = os.path.getsize(path)
    if size == 0:
        raise UserInputError(f'{path}: the weights file is empty; download or train it again')
    with open(path, 'rb') as f:
        head = f.read(20)
    if len(head) < 12:
        raise UserInputError(f'{path}: {size} bytes is too short for a Darknet .weights '
                             'header (12 to 20 bytes); the file is truncated')
    major, minor, revision = np.frombuffer(head[:12], dtype='<i4')
    if not (0 <= major < 1000 and 0 <= minor < 1000 and revision >= 0):
        raise UserInputError(f'{path}: not a Darknet .weights file (its header reads version '
                             f'{major}.{minor}.{revision}); pass a .weights file, or a .pt '
                             'checkpoint with a .pt extension')
    wide_seen = major * 10 + minor >= 2
    header_size = 20 if wide_seen else 16
    if len(head) < header_size:
        raise UserInputError(f'{path}: {size} bytes is too short for a Darknet .weights '
                             f'header ({header_size} bytes); the file is truncated')
    seen = int(np.frombuffer(head[12:header_size], dtype='<i8' if wide_seen else '<i4')[0])
    return (int(major), int(minor), int(revision)), seen, header_size


def _check_cutoff(model, cutoff):
    if cutoff is not None and not 1 <= cutoff <= len(model.module_defs):
        raise UserInputError(f'--cutoff {cutoff}: {model._name()} has layers 0..'
                             f'{len(model.module_defs) - 1}; use 1..{len(model.module_defs)}')
    if cutoff is not None and not conv_layers(model, cutoff):
        raise UserInputError(f'--cutoff {cutoff}: layers 0..{cutoff - 1} of {model._name()} '
                             'hold no conv; choose a larger cutoff')


def _file_floats(path, header_size):
    """Whole float32 values after the header (a torn last value is not counted)."""
    return (os.path.getsize(path) - header_size) // 4


def load_darknet_weights(model, path, cutoff=None):
    """Load a Darknet .weights file; its float count must match the cfg exactly.

    `cutoff=N` loads the convs of layers 0..N-1 from the start of the file, as
    `darknet partial` cuts a backbone: the file may hold more (a whole model) but not
    less (N is the number in the names darknet53.conv.74 and yolov3-tiny.conv.15).
    """
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: weights file not found; check the --weights path')
    _check_cutoff(model, cutoff)
    version, seen, header_size = _read_header(path)
    expected = darknet_float_count(model, cutoff)
    size = os.path.getsize(path)
    found_bytes = size - header_size
    if found_bytes != 4 * expected and (cutoff is None or found_bytes < 4 * expected):
        scope = '' if cutoff is None else f' (layers 0..{cutoff - 1})'
        found = (f'{found_bytes // 4}' if found_bytes % 4 == 0 else
                 f'{found_bytes // 4} and {found_bytes % 4} stray bytes')
        raise UserInputError(
            f'{path}: {model._name()}{scope} needs {expected} weights '
            f'({header_size + 4 * expected} bytes), the file has {found} '
            f'({size} bytes); the file is truncated or belongs to another cfg' +
            ('' if cutoff is not None else '; to start training from weights of another '
             'cfg, pass them to train.py --weights (transfer learning)'))
    values = torch.from_numpy(np.fromfile(path, dtype='<f4', count=expected,
                                          offset=header_size))
    position = 0
    with torch.no_grad():
        for _, block in conv_layers(model, cutoff):
            for tensor in darknet_tensors(block):
                n = tensor.numel()
                tensor.copy_(values[position:position + n].view_as(tensor))
                position += n
    model.seen, model.version = seen, version
    return model


def save_weights(model, path, cutoff=None):
    """Write Darknet .weights version 0.2.5 (int64 `seen`), atomically."""
    parts = [t.detach().cpu().float().reshape(-1) for _, block in conv_layers(model, cutoff)
             for t in darknet_tensors(block)]
    with atomic_output(path) as f:
        np.array([0, 2, 5], dtype='<i4').tofile(f)
        np.array([getattr(model, 'seen', 0)], dtype='<i8').tofile(f)
        torch.cat(parts).numpy().astype('<f4', copy=False).tofile(f)


# What torch.load raises on bytes that are no checkpoint (a damaged zip, text, a
# truncated or bit-flipped legacy pickle): found by tests/test_fuzz.py
TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError,
                     zipfile.BadZipFile, AttributeError, TypeError, UnicodeDecodeError,
                     KeyError, IndexError, struct.error, OverflowError)


def torch_load(path, fix):
    """torch.load(weights_only) of a file that may hold anything; a file it cannot read
    is a UserInputError that ends with `fix`."""
    try:
        with warnings.catch_warnings():
            # torch warns about an unusual pickle protocol just before failing on it
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise UserInputError(f'{path}: not a readable PyTorch checkpoint '
                             f'({e.__class__.__name__}); {fix}') from None


def _read_checkpoint(path):
    """The model state dict in a .pt file: {'model': state_dict, ...} or a bare one."""
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: checkpoint not found; check the --weights path')
    if os.path.getsize(path) == 0:
        raise UserInputError(f'{path}: the checkpoint file is empty')
    checkpoint = torch_load(path, 'pass a .pt saved by train.py, or a Darknet file with a '
                                  '.weights extension')
    state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserInputError(f"{path}: holds no model state dict (expected a dict of tensors "
                             "or {'model': state_dict, ...})")
    # DistributedDataParallel prefixes every key with 'module.'; early checkpoints of this
    # project also stored the anchors, which the cfg alone defines
    return {k[7:] if k.startswith('module.') else k: v for k, v in state.items()
            if not k.endswith('.anchors')}


def load_checkpoint_weights(model, path):
    """Load a .pt checkpoint, naming the first layer whose tensors do not fit."""
    state = _read_checkpoint(path)
    own = model.state_dict()
    for key, tensor in own.items():
        layer = key.split('.')[1] if key.startswith('module_list.') else key
        where = f'layer {layer}' + (f' [{model.module_defs[int(layer)]["type"]}]'
                                    if layer.isdigit() else '')
        if key not in state:
            raise UserInputError(f'{path}: {where}: {key} is missing; the checkpoint is for '
                                 f'another cfg than {model._name()}')
        if state[key].shape != tensor.shape:
            raise UserInputError(
                f'{path}: {where}: {key} has shape {tuple(state[key].shape)} in the file but '
                f'{tuple(tensor.shape)} in {model._name()}; the checkpoint is for another cfg')
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserInputError(f'{path}: has {len(extra)} tensors the cfg lacks (first: '
                             f'{extra[0]}); the checkpoint is for another cfg than '
                             f'{model._name()}')
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- transfer learning
#
# Weights trained for another cfg (COCO's 80 classes into a 1-class cfg, a backbone cut
# with `darknet partial`): every conv whose tensors have the target's shapes is copied,
# layer by layer in cfg order, and the rest is re-initialised. A .weights file holds no
# shapes, so its layout is found first (`darknet_source_layout`).

def init_head_biases(model, img_size, objects_per_image=8, heads=None):
    """Start the heads (all, or the [yolo] layer indices `heads`) near the data's priors:
    about `objects_per_image` positives per image in objectness, every class equally
    likely. Untrained heads output 0.5 for every cell; the gradient that pushes a whole
    image's cells down at once otherwise drives deep models into predicting nothing for
    many epochs."""
    with torch.no_grad():
        for i, layer in enumerate(model.module_defs):
            if layer['type'] != 'yolo' or (heads is not None and i not in heads):
                continue
            head = model.module_list[i]
            bias = model.module_list[i - 1].Conv2d.bias.view(head.num_anchors, -1)
            cells = (img_size / model.layer_strides[i]) ** 2  # of this head, per anchor
            bias[:, 4] = math.log(objects_per_image / cells)
            bias[:, 5:] = math.log(0.6 / max(head.num_classes - 0.99, 0.01))


def conv_shapes(model, cutoff=None):
    """{layer index: shapes of its tensors in .weights order} of every conv."""
    return {i: [tuple(t.shape) for t in darknet_tensors(block)]
            for i, block in conv_layers(model, cutoff)}


def with_classes(layers, classes):
    """A copy of `layers` whose heads detect `classes` (the conv before each [yolo]
    resized to len(mask) * (5 + classes) filters)."""
    layers = [dict(layer) for layer in layers]
    for i, layer in enumerate(layers):
        if layer['type'] == 'yolo' and i and layers[i - 1]['type'] == 'convolutional':
            layer['classes'] = classes
            layers[i - 1]['filters'] = len(layer['mask']) * (5 + classes)
    return layers


def _shell(cfg):
    """The model `cfg` describes, built on the meta device: shapes only, no memory."""
    with torch.device('meta'):
        return Darknet(cfg)


def _floats(shapes):
    return sum(math.prod(s) for tensors in shapes.values() for s in tensors)


def darknet_source_layout(model, floats, path='the file', source_cfg=None):
    """(how the file was read, {layer: tensor shapes}) for a .weights file of `floats`
    floats. `source_cfg` names the cfg it was trained with; else it is this cfg when the
    count fits, this topology with another classes= (the count is linear in it, so
    solved for), or this cfg's first layers (a `darknet partial` backbone). Several or
    no fitting readings are refused."""
    target = conv_shapes(model)
    if source_cfg is not None:
        shapes = conv_shapes(_shell(source_cfg))
        if _floats(shapes) != floats:
            raise UserInputError(f'{path}: --weights-cfg {source_cfg} needs {_floats(shapes)} '
                                 f'weights, the file has {floats}; pass the cfg it was '
                                 'trained with')
        return f'as {source_cfg}', shapes
    if _floats(target) == floats:
        return '', target
    readings = []
    classes = model.num_classes
    step = _floats(_classes_layout(model, classes + 1) or {}) - _floats(target)
    if step > 0 and (floats - _floats(target)) % step == 0:
        other = classes + (floats - _floats(target)) // step
        shapes = _classes_layout(model, other) if other >= 1 else None
        if shapes is not None and _floats(shapes) == floats:
            readings.append((f'as classes={other}', shapes))
    total = 0
    for i, tensors in target.items():
        total += _floats({i: tensors})
        if total == floats:
            readings.append((f'as a backbone: layers 0..{i}',
                             {j: s for j, s in target.items() if j <= i}))
    if len(readings) == 1:
        return readings[0]
    need = f'{model._name()} needs {_floats(target)}'
    if readings:
        raise UserInputError(f'{path}: its {floats} weights fit {model._name()} read '
                             f'{" or ".join(r for r, _ in readings)}; say which: pass the '
                             'source cfg with --weights-cfg, or --cutoff for a backbone')
    raise UserInputError(f'{path}: holds {floats} weights; {need}, and no other classes= '
                         'nor a backbone of it fits that count; pass the cfg the file was '
                         'trained with as --weights-cfg')


def _classes_layout(model, classes):
    """conv_shapes of this cfg with `classes` classes, or None where it does not build."""
    try:
        return conv_shapes(_shell((model.hyperparams, with_classes(model.module_defs,
                                                                   classes))))
    except UserInputError:
        return None


def _reinitialise(model, layers, img_size):
    """Fresh PyTorch initialisation of the convs at `layers`; head convs also get the
    head-bias priors."""
    heads = set()
    for i in layers:
        block = model.module_list[i]
        block.Conv2d.reset_parameters()
        if hasattr(block, 'BatchNorm2d'):
            block.BatchNorm2d.reset_parameters()
        if i + 1 < len(model.module_defs) and model.module_defs[i + 1]['type'] == 'yolo':
            heads.add(i + 1)
    init_head_biases(model, img_size, heads=heads)


def _layer_list(layers, convs):
    """'3, 5-9, 12': conv layer indices, a run of convs that follow each other in `convs`
    (all conv indices, in order) shortened to its ends."""
    runs, order = [], {i: n for n, i in enumerate(convs)}
    for i in layers:
        if runs and order[i] == order[runs[-1][1]] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ', '.join(f'{a}' if a == b else f'{a}-{b}' for a, b in runs)


def transfer_summary(model, path, reading, loaded, source_shapes, cutoff=None):
    """One line: how many convs came from the file and why the others were not."""
    reasons = {}
    for i, tensors in conv_shapes(model).items():
        if i in loaded:
            continue
        before = source_shapes.get(i)
        if cutoff is not None and i >= cutoff:
            why = f'from --cutoff {cutoff} on'
        elif before is None:
            why = 'not in the file'
        elif model.module_defs[i + 1:i + 2] and model.module_defs[i + 1]['type'] == 'yolo':
            why = f'[yolo] heads: {before[-1][0]} -> {tensors[-1][0]} filters'
        else:
            why = 'other shapes in the file'
        reasons.setdefault(why, []).append(i)
    line = (f'loaded {len(loaded)} of {len(conv_layers(model))} convs from '
            f'{os.path.basename(path)}{f" (read {reading})" if reading else ""}')
    if reasons:
        line += '; re-initialised layers ' + ', '.join(
            f'{_layer_list(layers, conv_shapes(model))} ({why})'
            for why, layers in reasons.items())
    return line


def transfer_weights(model, path, cutoff=None, source_cfg=None, img_size=None):
    """Load every conv of `path` (.weights or .pt) whose shapes fit `model`, re-initialise
    the others; returns the one-line summary. `cutoff=N` takes layers 0..N-1 only;
    `source_cfg` is the cfg a .weights file was trained with, when it cannot be inferred."""
    img_size = img_size or model.hyperparams.get('width') or 416
    _check_cutoff(model, cutoff)
    if is_checkpoint_path(path):
        if source_cfg is not None:
            raise UserInputError(f'--weights-cfg {source_cfg}: only for Darknet .weights; a '
                                 f'.pt checkpoint ({path}) carries its shapes')
        loaded, source_shapes = _transfer_checkpoint(model, path, cutoff)
        reading = ''
    else:
        loaded, source_shapes, reading = _transfer_darknet(model, path, cutoff, source_cfg)
    if not loaded:
        if is_checkpoint_path(path):  # names the first tensor that does not fit
            load_checkpoint_weights(model, path)
        raise UserInputError(f'{path}: not one conv of it has the shapes of {model._name()}; '
                             'the file is for another model')
    _reinitialise(model, [i for i, _ in conv_layers(model) if i not in loaded], img_size)
    return transfer_summary(model, path, reading, loaded, source_shapes, cutoff)


def _transfer_darknet(model, path, cutoff, source_cfg):
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: weights file not found; check the --weights path')
    _check_cutoff(model, cutoff)
    version, seen, header_size = _read_header(path)
    floats = _file_floats(path, header_size)
    if cutoff is not None:  # the target's own first layers, from a file at least as long
        load_darknet_weights(model, path, cutoff)
        source = conv_shapes(model, cutoff)
        return set(source), source, f'as layers 0..{cutoff - 1}'
    reading, source = darknet_source_layout(model, floats, path, source_cfg)
    values = torch.from_numpy(np.fromfile(path, dtype='<f4', count=_floats(source),
                                          offset=header_size))
    target, loaded, position = conv_shapes(model), set(), 0
    with torch.no_grad():
        for i, shapes in source.items():
            n = _floats({i: shapes})
            if target.get(i) == shapes:
                _copy_floats(model.module_list[i], values[position:position + n])
                loaded.add(i)
            position += n
    model.seen, model.version = seen, version
    return loaded, source, reading


def _copy_floats(block, values):
    """Fill a conv block's tensors, in .weights order, from a flat float tensor."""
    position = 0
    for tensor in darknet_tensors(block):
        n = tensor.numel()
        tensor.copy_(values[position:position + n].view_as(tensor))
        position += n


def _transfer_checkpoint(model, path, cutoff):
    """Copy the conv blocks of a .pt whose tensors all have this model's shapes."""
    state = _read_checkpoint(path)
    loaded, source = set(), {}
    for i, block in conv_layers(model, cutoff):
        # BN's step counter is no weight (and checkpoints of old PyTorch lack it)
        own = {k: v for k, v in block.state_dict(keep_vars=True).items()
               if not k.endswith('num_batches_tracked')}
        theirs = {k: state.get(f'module_list.{i}.{k}') for k in own}
        if theirs['Conv2d.weight'] is not None:
            source[i] = [tuple(theirs['Conv2d.weight'].shape)]
        if all(t is not None and t.shape == own[k].shape for k, t in theirs.items()):
            with torch.no_grad():
                for k, tensor in own.items():
                    tensor.copy_(theirs[k])
            loaded.add(i)
    return loaded, source


def is_checkpoint_path(path):
    return str(path).endswith(('.pt', '.pth'))


def load_weights(model, path, cutoff=None, transfer=False, source_cfg=None):
    """Load .pt/.pth checkpoints or Darknet weights (any other name) into `model`.

    By default the file must fit the cfg exactly (a backbone file: up to `cutoff`).
    `transfer=True` loads the convs that fit and re-initialises the rest
    (`transfer_weights`), printing what it did in one line."""
    if transfer:
        print(transfer_weights(model, path, cutoff, source_cfg))
        return model
    if is_checkpoint_path(path):
        return load_checkpoint_weights(model, path)
    return load_darknet_weights(model, path, cutoff)


def save_model_weights(model, path):
    """Save as .pt ({'model': state_dict}) or Darknet .weights, by the name's extension."""
    if is_checkpoint_path(path):
        with atomic_output(path) as f:
            torch.save({'model': model.state_dict()}, f)
    else:
        save_weights(model, path)


def convert_weights(cfg, source, target, cutoff=None):
    """Convert between .pt and .weights for the model `cfg` describes. `cutoff=N` writes
    the convs of layers 0..N-1 only, a Darknet backbone file as `darknet partial` cuts."""
    refuse_overwrite(target, (source, cfg), 'choose another output name')
    model = Darknet(cfg)
    if cutoff is not None and is_checkpoint_path(target):
        raise UserInputError(f'{target}: --cutoff writes a Darknet backbone file; name it '
                             f'without .pt/.pth (e.g. model.conv.{cutoff})')
    _check_cutoff(model, cutoff)
    load_weights(model, source)
    if cutoff is None:
        save_model_weights(model, target)
    else:
        save_weights(model, target, cutoff)
    return model
