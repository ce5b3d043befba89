"""Graph analysis: every output channel of every layer traced back to the conv channels
it is made of (its *origins*), and what follows from that for pruning.

Each layer type says how its channels derive from its inputs (darknet/layers.py):
maxpool and upsample pass channels through, a route concatenates (and with `groups`
slices) its inputs' channel lists, a shortcut sums channels, so a summed channel has the
origins of both (a partial residual sums the first channels only). From that one table:
- shortcut groups: convs whose channels are summed together must keep one mask (a
  narrower conv of a partial residual takes the first part of the group's mask);
- upsample feeders: convs whose channels reach an [upsample];
- sliced convs: convs whose output a `groups` route slices (kept whole for now);
- unfoldable convs: logistic ones, and those feeding grouped convs, stay whole.
The mode (normal, regular, shortcut, tiny; docs/pruning.md) then says which convs are
prunable and which share a mask (`prunable_units`). No layer index is written anywhere.
"""
from dataclasses import dataclass, field

import torch

from darknet.layers import INPUT, ChannelValues, layer_type, trace_channels
from utils.errors import UserInputError


@dataclass
class GraphInfo:
    """What the cfg's wiring says about its BN convs."""
    bn_convs: list = field(default_factory=list)    # layer indices of convs with BN
    origins: list = field(default_factory=list)     # per layer: per output channel, set of (conv, channel)
    shortcut_groups: list = field(default_factory=list)  # sets of convs tied by sums
    upsample_feeders: set = field(default_factory=set)
    sliced_convs: set = field(default_factory=set)
    # convs whose pruned channels could not be folded away: a zero gamma and beta would
    # not give a zero output (logistic), or a grouped conv reads them
    unfoldable: set = field(default_factory=set)
    # convs summed at a channel position other than their own channel's (a route
    # before a shortcut): their group cannot share one mask
    unaligned: set = field(default_factory=set)
    ties: list = field(default_factory=list)        # sets of convs summed into one channel
    has_shortcut: bool = False

    def group_of(self, conv):
        """The shortcut group holding `conv`, or None."""
        return next((g for g in self.shortcut_groups if conv in g), None)


# per-channel origin sets: a conv starts its own channels, a sum unites its terms' origins
ORIGINS = ChannelValues(
    new=lambda i, layer: [frozenset({(i, c)}) for c in range(layer['filters'])],
    cat=lambda parts: [o for part in parts for o in part],
    add=lambda a, b: [x | y for x, y in zip(a, b)],
    activate=lambda name, values: values)


def analyze_graph(layers, in_channels=3):
    """Trace every layer's output channels back to conv channels; see GraphInfo."""
    info = GraphInfo()

    def visit(i, layer, previous, out, traced):
        layer_type(layer).note(info, i, layer, previous, out, traced)

    info.origins = trace_channels(layers, ORIGINS,
                                  [frozenset({(INPUT, c)}) for c in range(in_channels)], visit)
    info.shortcut_groups = _merge_overlapping(info.ties)
    return info


def _merge_overlapping(sets):
    """Union of every chain of overlapping sets (shortcut chains become one group)."""
    groups = []
    for new in sets:
        merged = set(new)
        for group in [g for g in groups if g & merged]:
            merged |= group
            groups.remove(group)
        if merged:
            groups.append(merged)
    return groups


MODES = ('normal', 'regular', 'shortcut', 'tiny')


def prunable_convs(layers, mode, in_channels=3, info=None, name='the cfg'):
    """Layer indices of the BN convs whose channels `mode` may prune (docs/pruning.md);
    `name` (the cfg's path) names the model in a refusal."""
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}')
    info = info or analyze_graph(layers, in_channels)
    if mode == 'tiny' and info.has_shortcut:
        raise UserInputError(f'{name} has [shortcut] layers; tiny mode is for '
                             'yolov3-tiny-like models: use prune_shortcut.py or '
                             'prune_normal.py')
    kept_whole = info.upsample_feeders | info.sliced_convs | info.unfoldable
    if mode in ('normal', 'regular'):
        kept_whole |= set().union(*info.shortcut_groups)
    if mode == 'shortcut':  # a group is pruned with one mask only when all of it may be
        kept_whole |= set().union(*(g for g in info.shortcut_groups
                                    if g & (kept_whole | info.unaligned)
                                    or any(c not in info.bn_convs for c in g)))
    return [i for i in info.bn_convs if i not in kept_whole]


def _units(info, prunable, mode):
    """Convs that share a mask: whole shortcut groups in shortcut mode, else single convs."""
    if mode != 'shortcut':
        return [[i] for i in prunable]
    grouped = set().union(*info.shortcut_groups) if info.shortcut_groups else set()
    units = [sorted(g) for g in info.shortcut_groups if g <= set(prunable)]
    return sorted(units + [[i] for i in prunable if i not in grouped], key=lambda u: u[0])


def prunable_units(model, mode, info=None):
    """(graph info, units sharing a mask, {conv: |gamma|}) of the convs `mode` prunes."""
    channels_in = model.hyperparams.get('channels', 3)
    info = info or analyze_graph(model.module_defs, channels_in)
    prunable = prunable_convs(model.module_defs, mode, channels_in, info, model._name())
    gammas = {i: model.module_list[i].BatchNorm2d.weight.detach().abs().float().cpu()
              for i in prunable}
    return info, _units(info, prunable, mode), gammas


def conv_width(model, conv):
    """Output channels of the conv at layer `conv`."""
    return model.module_list[conv].Conv2d.out_channels


def input_positions(model, info):
    """For each conv j reading earlier conv channels: (j, [(input position, origin set)])."""
    for j, layer in enumerate(model.module_defs):
        if layer['type'] == 'convolutional' and j > 0:
            yield j, list(enumerate(info.origins[j - 1]))


def consumer_columns(model, j):
    """Per input position of conv j: (number of weights that read it, their sum of squares
    after dividing each output row by the conv's BatchNorm running std), each (in,)."""
    block = model.module_list[j]
    weight = block.Conv2d.weight.detach().float().cpu()  # (out, in / groups, kh, kw)
    if hasattr(block, 'BatchNorm2d'):
        bn = block.BatchNorm2d
        std = (bn.running_var.detach().float().cpu() + bn.eps).sqrt()
        weight = weight / std.view(-1, 1, 1, 1)
    groups = block.Conv2d.groups
    out, per_group = weight.shape[0], weight.shape[1]
    # (groups, out / groups, in / groups, kh, kw) -> per input position p = g * ipg + q
    energy = weight.pow(2).view(groups, out // groups, per_group, -1).sum((1, 3)).reshape(-1)
    count = torch.full_like(energy, out // groups * weight.shape[2] * weight.shape[3])
    return count, energy
