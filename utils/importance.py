"""Channel importance: the order in which a prune run cuts the channels of each unit.

A unit is one conv, or a shortcut group whose convs share one mask (see
utils/prune_utils.py). `unit_scores` gives one score per channel of every unit; lower is
cut first. `plan_masks` then cuts every channel under one global threshold, so the
scores of different units must be comparable. Raw |gamma| is comparable only after long
sparsity training: BatchNorm makes each layer's gamma scale arbitrary, since the next
layer's BatchNorm divides it out again. The criteria:

- gamma: |gamma| as it is; the original toolkit's rule (a group: its best branch).
- uniform: a channel's rank within its unit over the unit's width, so every unit loses
  the same share (the naive per-layer cut).
- gamma-mean, gamma-max, gamma-l2: |gamma| divided by the mean, max or root mean square
  of its conv's |gamma| (a group: its best branch).
- lamp: LAMP (Lee et al., ICLR 2021) on gamma^2: a channel's gamma^2 over the sum of the
  gamma^2 of the channels of its conv that are not smaller (a group: its best branch).
- consumer: |gamma| times the root sum of squares of every weight that reads the
  channel, each consumer conv's weights divided by that conv's BatchNorm running std:
  the channel's share of the next layers' normalised inputs, which does not depend on
  the layer's arbitrary scale (a group: summed over its convs).
- taylor: the first-order Taylor estimate of the loss change when the channel's gamma
  goes to 0, which is what pruning does (Molchanov et al., CVPR 2019): (sum over the
  unit's convs of gamma * dL/dgamma)^2, averaged over labelled calibration batches.

`channel_costs` gives what cutting a channel saves (parameters, or MACs at a size): its
own weights and BatchNorm plus every consumer weight that reads it. With a cost, the
planner cuts the least importance per parameter (or MAC) saved first.
"""
import torch

from utils.loss import compute_loss

CRITERIA = ('gamma', 'uniform', 'gamma-mean', 'gamma-max', 'gamma-l2', 'lamp', 'consumer',
            'taylor')
DATA_CRITERIA = ('taylor',)  # need labelled calibration batches


def _gamma(model, conv):
    return model.module_list[conv].BatchNorm2d.weight.detach().abs().float().cpu()


def stack_unit(values):
    """(convs, C) of per-conv (C_i,) values of one unit, zero-filled where a conv is
    narrower: a partial residual sums only the first channels, so channel k of a unit is
    channel k of every conv that has one (a max over convs needs values >= 0)."""
    width = max(len(v) for v in values)
    return torch.stack([torch.cat((v, v.new_zeros(width - len(v)))) for v in values])


def _best_branch(model, unit, per_conv):
    return stack_unit([per_conv(_gamma(model, i)) for i in unit]).max(0).values


def _lamp(gamma):
    squares = gamma ** 2
    order = squares.argsort()
    # for the k-th smallest: the sum of squares from it up to the largest
    tails = squares[order].flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = squares[order] / tails.clamp_min(1e-30)
    return scores


_PER_CONV = {
    'gamma': lambda g: g,
    'gamma-mean': lambda g: g / g.mean().clamp_min(1e-12),
    'gamma-max': lambda g: g / g.max().clamp_min(1e-12),
    'gamma-l2': lambda g: g / g.pow(2).mean().sqrt().clamp_min(1e-12),
    'lamp': _lamp,
}


def _input_positions(model, info):
    """For each conv j reading earlier conv channels: (j, [(input position, origin set)])."""
    for j, layer in enumerate(model.module_defs):
        if layer['type'] == 'convolutional' and j > 0:
            yield j, list(enumerate(info.origins[j - 1]))


def _consumer_columns(model, j):
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


def _own_cost(model, conv, measure):
    """What one output channel of `conv` costs itself: parameters (its filter, and its BN
    gamma and beta or its bias; running statistics are buffers) or multiply-accumulates
    per output pixel (its filter; utils.torch_utils.count_macs counts convs only)."""
    block = model.module_list[conv]
    extra = (2 if hasattr(block, 'BatchNorm2d') else 1) if measure == 'params' else 0
    return block.Conv2d.weight[0].numel() + extra


def channel_costs(model, info, units, measure='params', img_size=None):
    """Per unit, (C,) what cutting each channel saves: parameters, or MACs at `img_size`.
    A consumer's input column counts for a unit's channel only when every conv channel
    summed into that input belongs to the unit at that channel (so it goes with it)."""
    def cells(conv):
        return 1 if measure == 'params' else int(img_size // model.layer_strides[conv]) ** 2

    where = {}  # (conv, channel) -> (unit index, channel)
    costs = []
    for u, unit in enumerate(units):
        width = max(len(_gamma(model, i)) for i in unit)
        costs.append(torch.zeros(width, dtype=torch.float64))
        for i in unit:
            own = len(_gamma(model, i))
            costs[u][:own] += _own_cost(model, i, measure) * cells(i)
            for c in range(own):
                where[(i, c)] = (u, c)
    for j, positions in _input_positions(model, info):
        count, _ = _consumer_columns(model, j)
        for p, origin in positions:
            owners = {where.get(o) for o in origin}
            if len(owners) == 1 and None not in owners:
                u, c = owners.pop()
                costs[u][c] += float(count[p]) * cells(j)
    return [c.float() for c in costs]


def consumer_reach(model, info, convs):
    """{conv: (C,)} the root sum of squares of the normalised weights that read each
    output channel of `convs`: what the consumer criterion multiplies |gamma| by."""
    wanted, energy = set(convs), {}  # (conv, channel) -> sum of squares
    for j, positions in _input_positions(model, info):
        _, columns = _consumer_columns(model, j)
        for p, origin in positions:
            for o in origin:
                if o[0] in wanted:
                    energy[o] = energy.get(o, 0.0) + float(columns[p])
    return {i: torch.tensor([energy.get((i, c), 0.0) for c in range(len(_gamma(model, i)))]).sqrt()
            for i in sorted(wanted)}


def _consumer_scores(model, info, units):
    reach = consumer_reach(model, info, [i for unit in units for i in unit])
    return [stack_unit([_gamma(model, i) * reach[i] for i in unit]).sum(0) for unit in units]


def _taylor_scores(model, units, batches):
    """Mean over batches of (sum over a unit's convs of gamma * dL/dgamma)^2 per channel,
    with BatchNorm on its running statistics (the model is not changed)."""
    if not batches:
        raise ValueError('taylor needs calibration batches')
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bns = {i: model.module_list[i].BatchNorm2d for unit in units for i in unit}
    totals = [torch.zeros(max(len(_gamma(model, i)) for i in unit)) for unit in units]
    try:
        for imgs, targets in batches:
            for bn in bns.values():
                bn.weight.grad = None
            with torch.enable_grad():
                heads = model(imgs.to(device), raw=True)
                loss, _ = compute_loss(heads, targets.to(device), model)
                gammas = [bn.weight for bn in bns.values()]
                grads = dict(zip(bns, torch.autograd.grad(loss, gammas)))
            for u, unit in enumerate(units):
                # signed terms: zero-filling a narrower conv adds nothing to the sum
                change = stack_unit([(bns[i].weight.detach() * grads[i]).float().cpu()
                                     for i in unit]).sum(0)
                totals[u] += change ** 2
    finally:
        model.train(was_training)
    return [t / len(batches) for t in totals]


def unit_scores(model, info, units, criterion, batches=None):
    """Per unit, a (C,) importance of each output channel under `criterion`."""
    if criterion in _PER_CONV:
        return [_best_branch(model, unit, _PER_CONV[criterion]) for unit in units]
    if criterion == 'uniform':
        scores = []
        for unit in units:
            best = _best_branch(model, unit, _PER_CONV['gamma'])
            rank = torch.empty_like(best)
            rank[best.argsort()] = torch.arange(1, len(best) + 1, dtype=best.dtype)
            scores.append(rank / len(best))
        return scores
    if criterion == 'consumer':
        return _consumer_scores(model, info, units)
    if criterion == 'taylor':
        return _taylor_scores(model, units, batches)
    raise ValueError(f'unknown criterion {criterion!r}')
