"""Plans: the order channels are cut in (`Ranking`), and the masks one global threshold
over it gives (`PrunePlan`, `plan_masks`), or the threshold a parameter or MAC target
needs (`find_percent`). A plan is data, built first and applied after (pruning/surgery.py).
"""
import copy
import math
from dataclasses import dataclass

import torch

from darknet.model import Darknet
from pruning.costs import channel_costs
from pruning.criteria import get_criterion
from pruning.graph import GraphInfo, prunable_units
from pruning.latency import latency_costs, latency_table, make_timer, predicted_latency
from pruning.surgery import pruned_layers
from utils.errors import UserInputError
from utils.torch_utils import count_macs, count_parameters


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
    removed: float = None   # with a target: the share of its measure the plan removes
    allocation: str = 'threshold'  # or 'sensitivity': per-unit widths from measured losses
    settings: object = None  # the resolved PruneSettings that chose it (pruning/selection.py)
    candidates: list = None  # --criterion auto: every plan it tried, best first
    floored: int = 0         # channels the floors keep that the percent would cut


@dataclass
class Ranking:
    """The order a run cuts channels in: per unit, one key per channel, lowest cut first
    (the criterion's score, divided by the channel's cost when there is one)."""
    criterion: str
    cost: object            # None, 'params' or 'macs'
    info: GraphInfo
    units: list
    keys: list              # per unit, (C,) float tensor

    @property
    def population(self):
        """One key per prunable channel (a shortcut group's channel once): what
        --percent counts a share of, under every criterion."""
        return torch.cat(self.keys)


def rank_channels(model, mode, criterion='gamma', cost=None, img_size=None, batches=None,
                  info=None, table=None):
    """The Ranking of the channels `mode` prunes under `criterion` (a name registered in
    pruning/criteria.py). `cost` 'params' or 'macs' (at `img_size`) divides each score by
    what cutting the channel saves, 'latency' by the seconds it saves by `table`
    (pruning/latency.py); `batches`, a list of (images, targets), feeds the criteria
    that need data."""
    kind = get_criterion(criterion)
    if kind.needs_data and not batches:
        raise UserInputError(f'--criterion {criterion} scores channels on training images: '
                             'pass --data with a train= list')
    info, units, _ = prunable_units(model, mode, info)
    if not units:
        raise UserInputError(f'{model._name()}: no conv can be pruned in {mode} mode '
                             '(every BN conv is tied to an upsample, a sliced route or a '
                             'grouped conv); try another mode')
    keys = kind.scores(model, info, units, batches)
    if cost is None:
        return Ranking(criterion, cost, info, units, keys)
    if cost == 'latency':  # seconds saved, floored above 0 by latency_costs
        keys = [k / c for k, c in zip(keys, latency_costs(table, model, units))]
        return Ranking(criterion, cost, info, units, keys)
    costs = channel_costs(model, info, units, cost, img_size)
    keys = [k / c.clamp_min(1) for k, c in zip(keys, costs)]
    return Ranking(criterion, cost, info, units, keys)


def safe_count(ordered, keys):
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
    The plan counts in `floored` the channels the floors keep that the percent cuts.
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
    below = safe_count(ordered, ranking.keys)
    safe = below / len(ordered)
    if mode != 'regular' and layer_keep is None and count > below:
        raise UserInputError(f'--percent {percent:g} would empty a layer: the largest safe '
                             f'percent for this model and mode is {safe:.4f}; prune less, or '
                             'pass --layer-keep F to keep a share F of every layer')
    masks = {i: torch.ones(layer_module_width(model, i), dtype=torch.bool)
             for i in ranking.info.bn_convs}
    floored = 0  # channels the floors keep that the percent would cut
    for unit, key in zip(ranking.units, ranking.keys):
        keep = key > threshold
        target = int(keep.sum())
        if layer_keep is not None:
            floored += max(0, math.ceil(layer_keep * len(key)) - target)
            target = max(target, 1, math.ceil(layer_keep * len(key)))
        target = _rounded_count(target, len(key), round_to, mode)
        if target > keep.sum():  # top up with the best-scoring channels
            keep = torch.zeros_like(keep)
            keep[key.argsort(descending=True)[:target]] = True
        for i in unit:  # a narrower conv of a partial residual: the first channels
            masks[i] = keep[:len(masks[i])].clone()
    return PrunePlan(mode, percent, threshold, safe, ranking.units, masks, ranking.criterion,
                     floored=floored)


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
                 resolution=1e-4, ranking=None, start=None, table=None):
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
    attempts = {}

    def attempt(step):  # (plan, share removed) at percent step * resolution
        if step not in attempts:
            plan = plan_masks(model, mode, step * resolution, layer_keep, round_to,
                              ranking=ranking)
            attempts[step] = plan, removed_share(model, plan.masks, measure, img_size, table)
        return attempts[step]

    high = round(1 / resolution) - 1  # a plan exists at step 0; search (0, high]
    if mode != 'regular' and layer_keep is None:
        high = min(high, int(plan_masks(model, mode, 0.0, layer_keep, round_to,
                                        ranking=ranking).safe_percent
                             / resolution))
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


def removed_share(model, masks, measure, img_size, table=None):
    """The share of the model's parameters ('params'), MACs at img_size ('gmacs') or
    latency predicted by `table` ('latency') that cutting by `masks` removes."""
    if measure == 'latency':
        return 1 - predicted_latency(table, model, masks) / table.latency
    index = 0 if measure == 'params' else 1
    full = (count_parameters(model), count_macs(model, img_size))[index]
    return 1 - compact_cost(model, masks, img_size)[index] / full


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


def refuse_capped(plan, channels, allow_capped):
    """A --percent the floors cap by more than 1% of the channels is stopped, saying
    how much would go, unless the user accepts the capped plan."""
    if plan.floored > 0.01 * channels and not allow_capped:
        share = int(plan.percent * channels) - plan.floored
        raise UserInputError(
            f'--percent {plan.percent:g}: the per-layer floor keeps {plan.floored} of the '
            f'channels it would cut, so only {share / channels:.1%} of the prunable channels '
            'go; pass --allow-capped to accept that, or ask for less')


def threshold_plan(model, mode, settings, img_size, batches=None, start=None):
    """The plan one global threshold over the ranking of resolved `settings`'
    criterion and cost gives (pruning/settings.py): at their percent, or at
    the percent their target needs, searched from the percent `start` when given (the
    plan then carries `removed`, the share of the target's measure it removes).
    `batches` feed a criterion that scores on data."""
    measure = settings.target[0] if settings.target else None
    device = next(model.parameters()).device.type
    table = (latency_table(model, mode, img_size, make_timer(device))
             if 'latency' in (settings.cost, measure) else None)
    ranking = rank_channels(model, mode, settings.criterion, settings.ranking_cost, img_size,
                            batches, table=table)
    if settings.target is None:
        plan = plan_masks(model, mode, settings.percent, settings.layer_keep,
                          settings.round_to, ranking=ranking)
        refuse_capped(plan, len(ranking.population), settings.allow_capped)
        return plan
    measure, target = settings.target
    _, plan, share = find_percent(model, mode, target, measure, img_size, settings.layer_keep,
                                  settings.round_to, ranking=ranking, start=start, table=table)
    plan.removed = share
    return plan
