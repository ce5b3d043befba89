"""The Darknet model: built from a cfg, run as Darknet runs it.

    python -c "from darknet.model import Darknet; print(Darknet('cfg/yolov3-tiny.cfg'))"

Each layer type's module, checks and channel rules are in darknet/layers.py; this file
wires them from the typed cfg layers (darknet/cfg.py). Weights I/O is darknet/weights.py,
transfer learning darknet/transfer.py.
"""
import copy
import math
import os
from fractions import Fraction

import torch
import torch.nn as nn

from darknet.cfg import check_layers, parse_model_cfg
from darknet.layers import Shape, YOLOLayer, layer_type
from utils.errors import UserInputError


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
