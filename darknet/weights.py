"""Weights I/O: Darknet `.weights` (byte-exact, size-checked against the cfg) and
PyTorch `.pt` checkpoints, read into and written from a `Darknet` model.

A `.weights` file is a header (int32 major, minor, revision; `seen` as int64 from version
0.2 on, else int32) and then, per conv in cfg order, float32 values: with BatchNorm beta,
gamma, running mean, running variance, conv weights; without, bias and conv weights.
"""
import os
import pickle
import struct
import warnings
import zipfile

import numpy as np
import torch

from darknet.model import Darknet
from utils.errors import UserInputError
from utils.fileio import atomic_output, refuse_overwrite


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


def read_header(path):
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


def check_cutoff(model, cutoff):
    if cutoff is not None and not 1 <= cutoff <= len(model.module_defs):
        raise UserInputError(f'--cutoff {cutoff}: {model._name()} has layers 0..'
                             f'{len(model.module_defs) - 1}; use 1..{len(model.module_defs)}')
    if cutoff is not None and not conv_layers(model, cutoff):
        raise UserInputError(f'--cutoff {cutoff}: layers 0..{cutoff - 1} of {model._name()} '
                             'hold no conv; choose a larger cutoff')


def file_floats(path, header_size):
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
    check_cutoff(model, cutoff)
    version, seen, header_size = read_header(path)
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


def read_checkpoint(path):
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
    state = read_checkpoint(path)
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


def is_checkpoint_path(path):
    return str(path).endswith(('.pt', '.pth'))


def load_weights(model, path, cutoff=None):
    """Load .pt/.pth checkpoints or Darknet weights (any other name) into `model`; the
    file must fit the cfg exactly (a backbone file: up to `cutoff`). Weights of another
    cfg load through darknet.transfer.transfer_weights."""
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
    check_cutoff(model, cutoff)
    load_weights(model, source)
    if cutoff is None:
        save_model_weights(model, target)
    else:
        save_weights(model, target, cutoff)
    return model
