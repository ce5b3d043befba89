"""Transfer learning: weights trained for another cfg (COCO's 80 classes into a 1-class
cfg, a backbone cut with `darknet partial`) loaded into a model.

Every conv whose tensors have the target's shapes is copied, layer by layer in cfg order,
and the rest is re-initialised. A .weights file holds no shapes, so its layout is found
first (`darknet_source_layout`).
"""
import math
import os

import numpy as np
import torch

from darknet.model import Darknet
from darknet.weights import (check_cutoff, conv_layers, darknet_tensors, file_floats,
                             is_checkpoint_path, load_checkpoint_weights, load_darknet_weights,
                             read_checkpoint, read_header)
from utils.errors import UserInputError


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


def shell(cfg):
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
        shapes = conv_shapes(shell(source_cfg))
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
        return conv_shapes(shell((model.hyperparams, with_classes(model.module_defs,
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
    check_cutoff(model, cutoff)
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
    fresh = [i for i, _ in conv_layers(model) if i not in loaded]
    _reinitialise(model, fresh, img_size)
    if fresh:
        _rescale_to_fresh_norm(model, [i for i in sorted(loaded) if i > min(fresh)])
    return transfer_summary(model, path, reading, loaded, source_shapes, cutoff)


def _rescale_to_fresh_norm(model, layers):
    """Scale the weight of each BN conv at `layers` down to the norm of PyTorch's fresh
    init (std 1 / sqrt(3 fan_in)), and its running statistics with it: the same function.

    transfer_weights calls it for the loaded convs after the first re-initialised one
    (in a Darknet cfg, the branches that feed the later heads: yolov3-tiny's 18 and 21).
    A conv followed by BatchNorm is scale-invariant, so SGD moves it by about
    lr / |W|^2; trained Darknet convs are 2-7x the fresh norm (yolov3-tiny's 18 and 21:
    1.9x and 2.7x), so these layers adapted 4-7x slower than the fresh ones a backbone
    cut (--cutoff 15) puts there, and a few epochs from the whole COCO file trained
    worse than from its first 15 layers. yolov3-tiny at 128 px, mAP@0.5 after 3 epochs
    (mean of 2-3 seeds), whole file -> with this (--cutoff 15): shapes 0.26 -> 0.36
    (0.36), digits 0.28 -> 0.46 (0.50). The backbone before the first fresh conv keeps
    its norm: rescaling it too made it forget (shapes: 0.15)."""
    with torch.no_grad():
        for i in layers:
            block = model.module_list[i]
            if not hasattr(block, 'BatchNorm2d'):
                continue
            weight, bn = block.Conv2d.weight, block.BatchNorm2d
            scale = math.sqrt(weight.numel() / (3 * weight[0].numel())) / float(weight.norm())
            if scale < 1:
                weight.mul_(scale)
                bn.running_mean.mul_(scale)
                bn.running_var.mul_(scale * scale)


def _transfer_darknet(model, path, cutoff, source_cfg):
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: weights file not found; check the --weights path')
    check_cutoff(model, cutoff)
    version, seen, header_size = read_header(path)
    floats = file_floats(path, header_size)
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
    state = read_checkpoint(path)
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
