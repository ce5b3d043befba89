"""Layer-sensitivity allocation (`--allocate sensitivity`): how many channels each unit
keeps, chosen from what cutting them measurably costs instead of one global threshold.

One threshold over comparable scores decides for all units at once, so it is only as
good as the scores' comparability across layers, which no rule gets right on every
model (benchmarks/criteria.py). Here each unit is cut alone to a few widths, the
detection loss on calibration images is measured each time (the unit's loss curve),
and the widths are then chosen greedily: repeatedly take the unit whose next step down
costs the least loss increase per parameter (or MAC, or channel) saved, until the target
is met. Within a unit the criterion's order decides which channels go. The idea is
NetAdapt's and AMC's per-layer budgets (Yang et al., ECCV 2018; He et al., ECCV 2018),
measured on loss curves as in the sensitivity analysis of Li et al. (ICLR 2017).
"""
import heapq
import math

import torch

from darknet.loss import compute_loss
from pruning.costs import channel_costs
from pruning.plan import PrunePlan, compact_cost, layer_module_width, rank_channels, safe_count
from pruning.surgery import keep_size_model
from utils.errors import UserInputError
from utils.torch_utils import count_macs, count_parameters

KEEP_RATIOS = (0.75, 0.5, 0.25)  # widths each unit is measured at, besides its floor
# image forwards the curves may take in all, as a multiple of the calibration images;
# a model with many units is measured on fewer images (4 at least) to stay within it
FORWARD_BUDGET = 4


def calibration_loss(model, batches):
    """Mean detection loss of `model` (BN on running statistics) over `batches`."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for imgs, targets in batches:
            heads = model(imgs.to(device), raw=True)
            total += float(compute_loss(heads, targets.to(device), model)[0])
    return total / len(batches)


def allowed_counts(width, round_to, mode, layer_keep):
    """The kept widths a unit may have, widest first: multiples of `round_to` (regular
    mode without it: powers of two from 8), not under the floor `layer_keep` allows."""
    floor = max(1, math.ceil((layer_keep or 0) * width))
    if round_to:
        counts = range(width - (width % round_to or round_to), 0, -round_to)
    elif mode == 'regular':
        counts = [2 ** k for k in range(10, 2, -1) if 2 ** k < width]
    else:
        counts = range(width - 1, 0, -1)
    return [width] + [k for k in counts if k >= floor]


def measured_counts(allowed):
    """The allowed widths nearest to each KEEP_RATIOS share of the full one, and the
    narrowest: where a unit's loss curve is measured."""
    width = allowed[0]
    picks = {min(allowed, key=lambda k: abs(k - ratio * width)) for ratio in KEEP_RATIOS}
    return sorted((picks | {allowed[-1]}) - {width}, reverse=True)


def unit_masks(model, unit, order, kept):
    """{conv: mask} keeping the `kept` first channels of `order` in every conv of `unit`
    (a narrower conv of a partial residual: its share of them)."""
    keep = torch.zeros(len(order), dtype=torch.bool)
    keep[order[:kept]] = True
    return {i: keep[:layer_module_width(model, i)].clone() for i in unit}


def loss_curves(model, units, orders, allowed, batches):
    """Per unit, (widths, loss increases): the unit cut alone to each measured width,
    its cut channels folded away as the prune does, loss against the uncut model's.
    Increases never fall as the width does (noise is flattened)."""
    base = calibration_loss(model, batches)
    curves = []
    for unit, order, counts in zip(units, orders, allowed):
        widths, rises = [counts[0]], [0.0]
        for kept in measured_counts(counts):
            pruned, _ = keep_size_model(model, unit_masks(model, unit, order, kept))
            widths.append(kept)
            rises.append(max(rises[-1], calibration_loss(pruned, batches) - base))
        curves.append((widths, rises))
    return curves


def curve_at(curve, kept):
    """The loss increase at width `kept`, linear between the measured widths."""
    widths, rises = curve
    for (w0, r0), (w1, r1) in zip(zip(widths, rises), zip(widths[1:], rises[1:])):
        if w1 <= kept <= w0:
            return r0 + (r1 - r0) * (w0 - kept) / max(w0 - w1, 1)
    return rises[-1]


def greedy_widths(curves, allowed, savings, need, reached):
    """Per unit, an index into its `allowed` widths: steps taken cheapest first (loss
    increase per unit of `savings`, the cost each channel saves in cut order) until
    the summed savings reach `need` and `reached(indices)` holds."""
    index = [0] * len(curves)
    heap = []

    def push(u):
        if index[u] + 1 < len(allowed[u]):
            now, after = allowed[u][index[u]], allowed[u][index[u] + 1]
            saved = float(savings[u][after:now].sum())
            rise = max(curve_at(curves[u], after) - curve_at(curves[u], now), 0.0)
            heapq.heappush(heap, ((rise + 1e-12) / max(saved, 1e-12), u, saved))

    for u in range(len(curves)):
        push(u)
    total = 0.0
    while heap and (total < need or not reached(index)):
        _, u, saved = heapq.heappop(heap)
        index[u] += 1
        total += saved
        push(u)
    return index


def first_images(batches, count):
    """The first `count` images of `batches`, as batches (the last one cut short)."""
    taken, left = [], count
    for imgs, targets in batches:
        if left <= 0:
            break
        take = min(left, len(imgs))
        taken.append((imgs[:take], targets[targets[:, 0] < take]))
        left -= take
    return taken


def curve_batches(batches, measurements):
    """The calibration images the loss curves are measured on: all of them when the
    `measurements` fit FORWARD_BUDGET, else as many as do (4 at least)."""
    images = sum(len(imgs) for imgs, _ in batches)
    return first_images(batches, max(4, min(images, FORWARD_BUDGET * images // measurements)))


def sensitivity_plan(model, mode, settings, img_size, batches):
    """The PrunePlan of resolved `settings` with per-unit widths from measured loss
    curves (module docstring); channels within a unit in the criterion's order. Meets
    the settings' percent (a share of the prunable channels) or target (a share of the
    parameters or MACs), with their floors and rounding."""
    if not batches:
        raise UserInputError('--allocate sensitivity measures each layer\'s loss on training '
                             'images: pass --data with a train= list and --calibrate N > 0')
    ranking = rank_channels(model, mode, settings.criterion, None, img_size, batches)
    orders = [key.argsort(descending=True) for key in ranking.keys]
    allowed = [allowed_counts(len(key), settings.round_to, mode, settings.layer_keep)
               for key in ranking.keys]
    measurements = sum(len(measured_counts(counts)) for counts in allowed)
    curves = loss_curves(model, ranking.units, orders, allowed,
                         curve_batches(batches, measurements))
    channels = sum(len(key) for key in ranking.keys)
    if settings.target is None:  # a share of the channels: each counts 1
        savings = [torch.ones(len(key)) for key in ranking.keys]
        index = greedy_widths(curves, allowed, savings, settings.percent * channels,
                              lambda index: True)
        removed = None
    else:
        measure, target = settings.target
        costs = channel_costs(model, ranking.info, ranking.units,
                              'macs' if measure == 'gmacs' else 'params', img_size)
        savings = [cost[order] for cost, order in zip(costs, orders)]
        full = count_parameters(model) if measure == 'params' else count_macs(model, img_size)
        share = lambda index: 1 - _cost(model, ranking, orders, allowed, index, img_size,
                                        measure) / full
        index = greedy_widths(curves, allowed, savings, target * full,
                              lambda index: share(index) >= target)
        removed = share(index)
    masks = _masks(model, ranking, orders, allowed, index)
    cut = sum(counts[0] - counts[k] for counts, k in zip(allowed, index))
    _refuse_short(settings, cut / channels, removed)
    population = ranking.population.sort().values
    return PrunePlan(mode, cut / channels, float('nan'),
                     safe_count(population, ranking.keys) / len(population), ranking.units,
                     masks, ranking.criterion, removed, allocation='sensitivity')


def _refuse_short(settings, share, removed):
    """Stop when the floors leave the target (or the percent, unless capping is
    allowed) out of reach."""
    if settings.target is not None and removed < settings.target[1]:
        kind, target = settings.target
        raise UserInputError(f'--target-{kind} {target:g}: the per-layer floors let the '
                             f'sensitivity allocation remove at most {removed:.1%} of the '
                             f'{kind}; ask for less')
    if settings.target is None and share < settings.percent - 0.01 and not settings.allow_capped:
        raise UserInputError(f'--percent {settings.percent:g}: the per-layer floors let only '
                             f'{share:.1%} of the prunable channels go; pass --allow-capped '
                             'to accept that, or ask for less')


def _masks(model, ranking, orders, allowed, index):
    masks = {i: torch.ones(layer_module_width(model, i), dtype=torch.bool)
             for i in ranking.info.bn_convs}
    for unit, order, counts, k in zip(ranking.units, orders, allowed, index):
        masks.update(unit_masks(model, unit, order, counts[k]))
    return masks


def _cost(model, ranking, orders, allowed, index, img_size, measure):
    params, macs = compact_cost(model, _masks(model, ranking, orders, allowed, index), img_size)
    return params if measure == 'params' else macs
