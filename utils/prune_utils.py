"""The pruning library: graph analysis of a cfg -> which BN convs each mode may prune.

Graph analysis follows every output channel of every layer back to the conv channels
it is made of (its *origins*): maxpool and upsample pass channels through, a route
concatenates (and with `groups` slices) its inputs' channel lists, a shortcut sums two
channels, so its output channel has the origins of both. From that one table follow:
- shortcut groups: convs whose channels are summed together must keep one mask;
- upsample feeders: convs whose channels reach an [upsample];
- sliced convs: convs whose output a `groups` route slices (kept whole for now);
- consumers: for each conv, which input channel comes from which conv channel.
No layer index is written anywhere; everything is derived from the typed cfg layers.
"""
from dataclasses import dataclass, field

import torch

from utils.errors import UserInputError
from utils.parse_config import resolve_refs

INPUT = -1  # origin "layer" of the image channels


@dataclass
class GraphInfo:
    """What the cfg's wiring says about its BN convs."""
    bn_convs: list                                  # layer indices of convs with BN
    origins: list                                   # per layer: per output channel, set of (conv, channel)
    shortcut_groups: list = field(default_factory=list)  # sets of convs tied by sums
    upsample_feeders: set = field(default_factory=set)
    sliced_convs: set = field(default_factory=set)
    has_shortcut: bool = False

    def group_of(self, conv):
        """The shortcut group holding `conv`, or None."""
        return next((g for g in self.shortcut_groups if conv in g), None)


def analyze_graph(layers, in_channels=3):
    """Trace every layer's output channels back to conv channels; see GraphInfo."""
    origins, info = [], GraphInfo(bn_convs=[], origins=[])
    previous = [frozenset({(INPUT, c)}) for c in range(in_channels)]
    ties = []  # sets of convs summed into one channel somewhere
    for i, layer in enumerate(layers):
        kind = layer['type']
        if kind == 'convolutional':
            out = [frozenset({(i, c)}) for c in range(layer['filters'])]
            if layer.get('batch_normalize', 0):
                info.bn_convs.append(i)
        elif kind in ('maxpool', 'yolo'):
            out = previous
        elif kind == 'upsample':
            info.upsample_feeders |= _convs_in(previous)
            out = previous
        elif kind == 'route':
            groups, group_id = layer.get('groups', 1), layer.get('group_id', 0)
            out = []
            for source in resolve_refs(i, layer['layers']):
                channels = origins[source]
                if groups > 1:
                    info.sliced_convs |= _convs_in(channels)
                    size = len(channels) // groups
                    channels = channels[group_id * size:(group_id + 1) * size]
                out += channels
        elif kind == 'shortcut':
            other = origins[resolve_refs(i, layer['from'])[0]]
            if len(other) != len(previous):
                raise UserInputError(f'layer {i} [shortcut]: adds {len(other)} channels to '
                                     f'{len(previous)}; widths must be equal')
            out = [a | b for a, b in zip(previous, other)]
            ties += [_convs_in([o]) for o in out]
            info.has_shortcut = True
        else:
            raise UserInputError(f'layer {i}: unknown layer type [{kind}]')
        origins.append(out)
        previous = out
    info.origins = origins
    info.shortcut_groups = _merge_overlapping(ties)
    return info


def _convs_in(channel_origins):
    return {layer for origin in channel_origins for layer, _ in origin if layer != INPUT}


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


def prunable_convs(layers, mode, in_channels=3, info=None):
    """Layer indices of the BN convs whose channels `mode` may prune (DOMAIN.md)."""
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}')
    info = info or analyze_graph(layers, in_channels)
    if mode == 'tiny' and info.has_shortcut:
        raise UserInputError('the cfg has [shortcut] layers; tiny mode is for '
                             'yolov3-tiny-like models: use prune_shortcut.py or '
                             'prune_normal.py')
    kept_whole = info.upsample_feeders | info.sliced_convs
    if mode in ('normal', 'regular'):
        kept_whole |= set().union(*info.shortcut_groups)
    if mode == 'shortcut':  # a group is pruned with one mask only when all of it may be
        kept_whole |= set().union(*(g for g in info.shortcut_groups if g & kept_whole
                                    or any(c not in info.bn_convs for c in g)))
    return [i for i in info.bn_convs if i not in kept_whole]


SPARSITY_MODES = {0: 'normal', 1: 'shortcut', 2: 'tiny'}  # train.py --prune


def prunable_bn_modules(model, mode):
    """The BatchNorm2d modules of `model` whose gammas `mode` prunes, in layer order."""
    channels = model.hyperparams.get('channels', 3)
    return [model.module_list[i].BatchNorm2d
            for i in prunable_convs(model.module_defs, mode, channels)]


def add_sparsity_gradient(bn_modules, s):
    """L1 penalty on BN gammas: add s * sign(gamma) to their gradients (after backward)."""
    for bn in bn_modules:
        if bn.weight.grad is not None:
            bn.weight.grad.add_(torch.sign(bn.weight.detach()), alpha=s)


def sparsity_report(bn_modules, small=0.01):
    """Share of gammas under `small`, and the largest percent prunable without
    emptying a layer (the smallest per-layer max |gamma|'s rank in the sorted list)."""
    if not bn_modules:
        return {'channels': 0, 'share_small': 0.0, 'max_safe_percent': 0.0}
    gammas = [bn.weight.detach().abs().float().cpu() for bn in bn_modules]
    everything = torch.cat(gammas)
    limit = min(g.max() for g in gammas)
    return {'channels': everything.numel(),
            'share_small': (everything < small).float().mean().item(),
            'max_safe_percent': (everything < limit).float().mean().item()}
