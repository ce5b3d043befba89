"""The pruning library: graph analysis -> masks (the mode's policy) -> folding -> compact.

1. Graph analysis follows every output channel of every layer back to the conv channels
it is made of (its *origins*); each layer type says how (utils/layers.py): maxpool and
upsample pass channels through, a route concatenates (and with `groups` slices) its
inputs' channel lists, a shortcut sums channels, so a summed channel has the origins of
both (a partial residual sums the first channels only). From that one table follow:
- shortcut groups: convs whose channels are summed together must keep one mask (a
  narrower conv of a partial residual takes the first part of the group's mask);
- upsample feeders: convs whose channels reach an [upsample];
- sliced convs: convs whose output a `groups` route slices (kept whole for now);
- unfoldable convs: logistic ones, and those feeding grouped convs, stay whole.
2. Masks: the criterion scores every prunable channel (`rank_channels`, criteria in
   utils/importance.py), one global threshold over the scores cuts them; the mode decides
   which convs are prunable, and per-layer floors and rounding adjust the counts
   (`plan_masks`).
3. Folding: a cut channel still outputs act(beta); that constant is followed through
   the graph and folded into every conv that reads it (`pruned_constants`,
   `fold_constants`), giving the keep-size model.
4. Compact model: new cfg widths, weights copied by kept output / live input indices.
5. BatchNorm recalibration (`recalibrate_bn`): the compact model's running statistics
   re-estimated on a few training images, since the cut changed every later layer's input.
No layer index is written anywhere; everything is derived from the typed cfg layers.
"""
import copy
import math
from dataclasses import dataclass, field

import torch

from models import Darknet
from utils.errors import UserInputError
from utils.importance import CRITERIA, DATA_CRITERIA, channel_costs, stack_unit, unit_scores
from utils.layers import ACTIVATIONS, INPUT, ChannelValues, layer_type, trace_channels
from utils.torch_utils import count_macs, count_parameters


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


SPARSITY_MODES = {0: 'normal', 1: 'shortcut', 2: 'tiny'}  # train.py --prune


def prunable_bn_modules(model, mode):
    """The BatchNorm2d modules of `model` whose gammas `mode` prunes, in layer order."""
    channels = model.hyperparams.get('channels', 3)
    return [model.module_list[i].BatchNorm2d
            for i in prunable_convs(model.module_defs, mode, channels, name=model._name())]


def add_sparsity_gradient(bn_modules, s):
    """L1 penalty on BN gammas: add s * sign(gamma) to their gradients (after backward)."""
    for bn in bn_modules:
        if bn.weight.grad is not None:
            bn.weight.grad.add_(torch.sign(bn.weight.detach()), alpha=s)


def sparsity_report(model, mode, small=0.01):
    """Share of the mode's prunable gammas under `small`, and the largest share of them
    that could be pruned without emptying a layer (or a shortcut group)."""
    _, units, gammas = prunable_units(model, mode)
    if not units:
        return {'channels': 0, 'share_small': 0.0, 'max_safe_percent': 0.0}
    keys = _unit_keys(units, gammas)
    ordered = torch.cat(list(gammas.values())).sort().values
    return {'channels': len(ordered), 'share_small': float((ordered < small).float().mean()),
            'max_safe_percent': _safe_count(ordered, keys) / len(ordered)}


# ---------------------------------------------------------------- masks

@dataclass
class PrunePlan:
    """Which channels a run keeps, and the figures it was decided from."""
    mode: str
    percent: float
    threshold: float        # channels scoring <= threshold are pruned (before top-ups)
    safe_percent: float     # the largest share that empties no unit
    units: list             # lists of convs that share one mask (shortcut groups, or one conv)
    masks: dict             # conv layer -> bool tensor over its output channels, True = keep
    criterion: str = 'gamma'


@dataclass
class Ranking:
    """The order a run cuts channels in: per unit, one key per channel, lowest cut first
    (the criterion's score, divided by the channel's cost when there is one)."""
    criterion: str
    cost: object            # None, 'params' or 'macs'
    info: GraphInfo
    units: list
    keys: list              # per unit, (C,) float tensor
    # the values --percent counts a share of: every conv's own |gamma| under `gamma` (the
    # original toolkit's threshold, where a group's channel counts once per conv), else
    # the keys themselves, one per channel of a unit
    population: torch.Tensor = None


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


def _unit_keys(units, gammas):
    """The `gamma` criterion's keys: a channel's best branch."""
    return [stack_unit([gammas[i] for i in unit]).max(0).values for unit in units]


def rank_channels(model, mode, criterion='gamma', cost=None, img_size=None, batches=None,
                  info=None):
    """The Ranking of the channels `mode` prunes under `criterion` (utils/importance.py).
    `cost` 'params' or 'macs' (at `img_size`) divides each score by what cutting the
    channel saves; `batches`, a list of (images, targets), feeds the data criteria."""
    if criterion not in CRITERIA:
        raise UserInputError(f'--criterion {criterion}: unknown; choose one of '
                             f'{", ".join(CRITERIA)}')
    if criterion in DATA_CRITERIA and not batches:
        raise UserInputError(f'--criterion {criterion} scores channels on training images: '
                             'pass --data with a train= list')
    info, units, gammas = prunable_units(model, mode, info)
    if not units:
        raise UserInputError(f'{model._name()}: no conv can be pruned in {mode} mode '
                             '(every BN conv is tied to an upsample, a sliced route or a '
                             'grouped conv); try another mode')
    if criterion == 'gamma' and cost is None:
        return Ranking(criterion, cost, info, units, _unit_keys(units, gammas),
                       torch.cat(list(gammas.values())))
    keys = (_unit_keys(units, gammas) if criterion == 'gamma'
            else unit_scores(model, info, units, criterion, batches))
    if cost is not None:
        costs = channel_costs(model, info, units, cost, img_size)
        keys = [k / c.clamp_min(1) for k, c in zip(keys, costs)]
    return Ranking(criterion, cost, info, units, keys, torch.cat(keys))


def _safe_count(ordered, keys):
    """How many of the `ordered` keys can go before a unit loses its last channel: a
    unit is emptied once the cut reaches the smallest of the units' largest keys."""
    limit = min(float(k.max()) for k in keys)
    return int((ordered < limit).sum())


def _rounded_count(kept, channels, round_to, mode):
    """Kept count rounded up to a multiple of `round_to`; in regular mode without it, to
    a power of two (8..1024). Never above the layer's width."""
    if round_to:
        target = max(round_to, -(-kept // round_to) * round_to)
    elif mode == 'regular':
        target = 8
        while target < kept and target < 1024:
            target *= 2
    else:
        target = kept
    return min(max(target, kept), channels)


def plan_masks(model, mode, percent, layer_keep=None, round_to=None, info=None, ranking=None):
    """Masks for `mode` at one global threshold on the ranking's keys (by default the
    `gamma` criterion: |gamma|) that prunes `percent` of the prunable channels. A shortcut
    group keeps one key per channel, so a channel goes only when the whole group may
    lose it. Refuses a percent that would empty a unit unless `layer_keep` (keep at
    least that share of each unit, one channel at least); regular mode never empties
    one. `round_to` rounds kept counts up to its multiples in any mode (regular mode
    without it: powers of two); rounding and floors add the best-scoring channels.
    """
    if not 0 <= percent < 1:
        raise UserInputError(f'--percent {percent}: must be in [0, 1), e.g. 0.5 prunes half '
                             'of the prunable channels')
    if layer_keep is not None and not 0 < layer_keep <= 1:
        raise UserInputError(f'--layer-keep {layer_keep}: must be in (0, 1]')
    if round_to is not None and round_to < 1:
        raise UserInputError(f'--round-to {round_to}: must be a positive channel count')
    ranking = ranking or rank_channels(model, mode, info=info)
    ordered = ranking.population.sort().values
    count = int(len(ordered) * percent)
    threshold = float(ordered[count - 1]) if count else float('-inf')
    below = _safe_count(ordered, ranking.keys)
    safe = below / len(ordered)
    if mode != 'regular' and layer_keep is None and count > below:
        raise UserInputError(f'--percent {percent:g} would empty a layer: the largest safe '
                             f'percent for this model and mode is {safe:.4f}; prune less, or '
                             'pass --layer-keep F to keep a share F of every layer')
    masks = {i: torch.ones(layer_module_width(model, i), dtype=torch.bool)
             for i in ranking.info.bn_convs}
    for unit, key in zip(ranking.units, ranking.keys):
        keep = key > threshold
        target = int(keep.sum())
        if layer_keep is not None:
            target = max(target, 1, math.ceil(layer_keep * len(key)))
        target = _rounded_count(target, len(key), round_to, mode)
        if target > keep.sum():  # top up with the best-scoring channels
            keep = torch.zeros_like(keep)
            keep[key.argsort(descending=True)[:target]] = True
        for i in unit:  # a narrower conv of a partial residual: the first channels
            masks[i] = keep[:len(masks[i])].clone()
    return PrunePlan(mode, percent, threshold, safe, ranking.units, masks, ranking.criterion)


def layer_module_width(model, i):
    return model.module_list[i].Conv2d.out_channels


# ---------------------------------------------------------------- percent finder

def compact_cost(model, masks, img_size):
    """(parameters, MACs) of the compact model `masks` give, from its shapes alone: the
    model is built on the meta device, so no memory is allocated and nothing is copied."""
    with torch.device('meta'):
        shell = Darknet((copy.deepcopy(model.hyperparams), pruned_layers(model.module_defs, masks)))
    return count_parameters(shell), count_macs(shell, img_size)


def find_percent(model, mode, target, measure, img_size, layer_keep=None, round_to=None,
                 resolution=1e-4, ranking=None, start=None):
    """The smallest percent (a multiple of `resolution`) whose compact model removes at
    least the share `target` of the original's parameters (`measure` 'params') or MACs
    ('gmacs'). Cutting more channels never adds cost (the masks are nested as the
    threshold rises), so a bisection over the percent finds it; `start`, a percent near
    the answer (the last epoch's, for the sparsity monitor), makes it a search outward
    from there in a few steps. Returns (percent, plan, share removed); refuses a target
    beyond the largest percent the mode allows. `ranking` (rank_channels) orders the
    channels; by default the `gamma` criterion."""
    if not 0 < target < 1:
        raise UserInputError(f'--target-{measure} {target}: must be in (0, 1), the share of '
                             f'the {measure} to remove (0.6 removes 60%)')
    ranking = ranking or rank_channels(model, mode)
    index = 0 if measure == 'params' else 1
    full = (count_parameters(model), count_macs(model, img_size))[index]
    attempts = {}

    def attempt(step):  # (plan, share removed) at percent step * resolution
        if step not in attempts:
            plan = plan_masks(model, mode, step * resolution, layer_keep, round_to,
                              ranking=ranking)
            attempts[step] = plan, 1 - compact_cost(model, plan.masks, img_size)[index] / full
        return attempts[step]

    high = round(1 / resolution) - 1  # a plan exists at step 0; search (0, high]
    if mode != 'regular' and layer_keep is None:
        high = min(high, int(plan_masks(model, mode, 0.0, layer_keep, round_to,
                                        ranking=ranking).safe_percent / resolution))
    if attempt(high)[1] < target:
        raise UserInputError(
            f'--target-{measure} {target:g}: {mode} mode removes at most {attempt(high)[1]:.1%} '
            f'of the {measure} of this model (at --percent {high * resolution:.4f}'
            + ('' if layer_keep is not None or mode == 'regular'
               else ', its largest safe percent; --layer-keep F allows more')
            + '); ask for less')
    guess = None if start is None else round(start / resolution)
    step = _first_reaching(lambda k: attempt(k)[1] >= target, 0, high, guess)
    plan, share = attempt(step)
    return step * resolution, plan, share


def _first_reaching(reaches, low, high, guess=None):
    """The smallest step in (low, high] where the monotone `reaches` holds, given that it
    holds at `high` and not at `low`. From a `guess` inside, steps of doubling width
    bracket the answer first; then a bisection."""
    if guess is not None and low < guess < high:
        width = 1
        if reaches(guess):
            high = guess
            while high - width > low and reaches(high - width):
                high, width = high - width, 2 * width
            low = max(low, high - width)
        else:
            low = guess
            while low + width < high and not reaches(low + width):
                low, width = low + width, 2 * width
            high = min(high, low + width)
    while high - low > 1:
        middle = (low + high) // 2
        if reaches(middle):
            high = middle
        else:
            low = middle
    return high


# ---------------------------------------------------------------- folding

def _constant_values(model, masks):
    """Per-channel constants: a pruned conv channel outputs act(beta) (its gamma is ~0),
    a live one NaN; a sum of constants is constant, of anything live live."""
    def new(i, layer):
        out = torch.full((layer['filters'],), float('nan'))
        if i in masks and not masks[i].all():
            beta = model.module_list[i].BatchNorm2d.bias.detach().float().cpu()
            act = ACTIVATIONS[layer.get('activation', 'logistic')].function
            out[~masks[i]] = act(beta[~masks[i]])
        return out

    def add(a, b):
        assert not (a.isnan() != b.isnan()).any(), 'a shortcut sums pruned and live channels'
        return a + b

    return ChannelValues(new=new, cat=torch.cat, add=add,
                         activate=lambda name, values: ACTIVATIONS[name].function(values))


def pruned_constants(model, masks):
    """Per layer, (C,) tensor of each output channel's constant value, NaN where the
    channel is live, carried through every layer as its type says (utils/layers.py)."""
    channels = model.hyperparams.get('channels', 3)
    return trace_channels(model.module_defs, _constant_values(model, masks),
                          torch.full((channels,), float('nan')))


def fold_constants(model, constants):
    """Fold each conv's constant inputs into its BN running_mean (or its bias): with
    weights W (out, in, kh, kw), a constant input c adds W.sum((2, 3)) @ c everywhere
    (exactly in the interior, approximately on zero-padded borders)."""
    with torch.no_grad():
        for i, layer in enumerate(model.module_defs):
            if layer['type'] != 'convolutional' or i == 0:
                continue
            c = constants[i - 1]
            if not (~c.isnan()).any():
                continue
            conv = model.module_list[i].Conv2d
            assert conv.groups == 1, f'layer {i}: constants reach a grouped conv'
            weight = conv.weight.detach().sum((2, 3))  # (out, in)
            offset = weight @ torch.nan_to_num(c, nan=0.0).to(weight)  # (out,)
            block = model.module_list[i]
            if hasattr(block, 'BatchNorm2d'):
                block.BatchNorm2d.running_mean.sub_(offset)
            else:
                conv.bias.add_(offset)


def keep_size_model(model, masks):
    """Same shapes; pruned channels' gamma and beta zeroed, their act(beta) folded into
    every consumer. Pruned channels then output act(0) = 0 (logistic convs, whose act(0)
    is not 0, are never pruned)."""
    constants = pruned_constants(model, masks)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for i, mask in masks.items():
            bn = pruned.module_list[i].BatchNorm2d
            bn.weight[~mask] = 0
            bn.bias[~mask] = 0
    fold_constants(pruned, constants)
    return pruned, constants


def pruned_layers(module_defs, masks):
    """A copy of the cfg layers with each masked conv's `filters` set to its kept count."""
    layers = copy.deepcopy(module_defs)
    for i, mask in masks.items():
        layers[i]['filters'] = int(mask.sum())
    return layers


def compact_model(keep_size, masks, constants):
    """The pruned model with the kept widths, weights copied from the keep-size model."""
    layers = pruned_layers(keep_size.module_defs, masks)
    compact = Darknet((copy.deepcopy(keep_size.hyperparams), layers)).to(
        next(keep_size.parameters()).device)
    channels_in = keep_size.hyperparams.get('channels', 3)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if layer['type'] != 'convolutional':
                continue
            out_idx = masks[i].nonzero()[:, 0] if i in masks else None
            in_idx = (torch.arange(channels_in) if i == 0
                      else constants[i - 1].isnan().nonzero()[:, 0])
            _copy_conv(keep_size.module_list[i], compact.module_list[i], out_idx, in_idx)
    compact.seen = keep_size.seen
    return compact


def _copy_conv(source, target, out_idx, in_idx):
    """Copy a conv block's kept output channels (`out_idx`, None = all) of its live inputs."""
    weight = source.Conv2d.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx.to(weight.device)]
    if source.Conv2d.groups == 1:
        weight = weight[:, in_idx.to(weight.device)]
    assert weight.shape == target.Conv2d.weight.shape, (weight.shape, target.Conv2d.weight.shape)
    target.Conv2d.weight.copy_(weight)
    pick = (lambda t: t.detach()) if out_idx is None else (lambda t: t.detach()[out_idx.to(t.device)])
    if hasattr(source, 'BatchNorm2d'):
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            value = pick(getattr(source.BatchNorm2d, name))
            assert value.shape == getattr(target.BatchNorm2d, name).shape
            getattr(target.BatchNorm2d, name).copy_(value)
    else:
        target.Conv2d.bias.copy_(pick(source.Conv2d.bias))


def prune(model, plan):
    """(keep-size model, compact model) for `plan`."""
    keep_size, constants = keep_size_model(model, plan.masks)
    return keep_size, compact_model(keep_size, plan.masks, constants)


def output_difference(first, second, img_size, seed=0):
    """Largest disagreement of two models' detections on one random image, as a share of
    the output scale: box coordinates over the input size, probabilities as they are."""
    device = next(first.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, first.hyperparams.get('channels', 3), img_size, img_size,
                   generator=generator).to(device)
    with torch.no_grad():
        a, b = first.eval()(x), second.eval()(x)
    boxes = (a[..., :4] - b[..., :4]).abs().max() / img_size
    return float(max(boxes, (a[..., 4:] - b[..., 4:]).abs().max()))


# ---------------------------------------------------------------- recalibration

def recalibrate_bn(model, batches, variances=False):
    """Re-estimate every BatchNorm's running mean (and with `variances` its running
    variance) on `batches`, a list of (images, targets); no labels or gradients are used.
    Each statistic becomes the equal-weight average over the batches, as after a
    train-mode pass with momentum None. A cut changes what every later layer sees, so
    statistics measured before it no longer fit (adaptive BN: Li et al., EagleEye, ECCV
    2020). The variances are kept by default: folding already moved each consumer's mean
    by the cut channels' constant output, and renormalising the variance scales the kept
    channels up to fill the variance of the cut ones, which cost mAP on most rows of
    benchmarks/criteria.py. Returns the model in eval mode."""
    device = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(bn.momentum, bn.running_var.clone()) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for imgs, _ in batches:
                model(imgs.to(device))
    finally:
        for bn, (momentum, var) in zip(bns, saved):
            bn.momentum = momentum
            if not variances:
                bn.running_var.copy_(var)
        model.eval()
    return model
