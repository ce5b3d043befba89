"""Channel criteria: the order in which a prune run cuts the channels of each unit.

A unit is one conv, or a shortcut group whose convs share one mask (pruning/graph.py).
A criterion gives one score per channel of every unit; lower is cut first. The planner
(pruning/plan.py) then cuts every channel under one global threshold, so the scores of
different units must be comparable. Raw |gamma| is comparable only after long sparsity
training: BatchNorm makes each layer's gamma scale arbitrary, since the next layer's
BatchNorm divides it out again.

Each criterion is one `Criterion` subclass: its name (the --criterion value), whether it
needs labelled calibration images, its default cost and per-layer ceiling, and its
`scores`. Defining the subclass registers it in CRITERIA; docs/library.md shows how to
add one. The criteria, in the order --help lists them:

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
- filter-norm: the L1 norm of the channel's filter (Li et al., "Pruning filters for
  efficient ConvNets", ICLR 2017) over the mean of its conv's (a group: its best
  branch). Behind a BatchNorm the filter's scale is divided out again, so this reads
  the relative norms within a conv only.
"""
import torch

from darknet.loss import compute_loss
from pruning.graph import consumer_columns, conv_width, input_positions
from utils.errors import UserInputError

CRITERIA = {}  # name -> Criterion subclass, in definition order


class Criterion:
    """How important each channel of each unit is. A subclass sets `name` and writes
    `scores`; the class attributes say what the planner assumes when the user does not."""
    name = None
    needs_data = False              # scores from labelled calibration batches
    default_cost = 'params'         # rank per parameter saved; None: by score alone
    default_max_layer_prune = 0.9   # the largest share of a unit to cut; None: any
    score_label = None              # what the summary calls a score ('<name> score')

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            CRITERIA[cls.name] = cls

    def scores(self, model, info, units, batches=None):
        """Per unit, a (C,) importance of each output channel; lower is cut first.
        `info` is the GraphInfo, `batches` a list of (images, targets) or None."""
        raise NotImplementedError

    def label(self):
        return self.score_label or f'{self.name} score'


def get_criterion(name):
    """The registered criterion called `name`, or a one-line refusal listing them."""
    if name not in CRITERIA:
        raise UserInputError(f'--criterion {name}: unknown; choose one of '
                             f'{", ".join(CRITERIA)}')
    return CRITERIA[name]()


def gamma_of(model, conv):
    """|gamma| of the conv at layer `conv`, (C,) float on the CPU."""
    return model.module_list[conv].BatchNorm2d.weight.detach().abs().float().cpu()


def stack_unit(values):
    """(convs, C) of per-conv (C_i,) values of one unit, zero-filled where a conv is
    narrower: a partial residual sums only the first channels, so channel k of a unit is
    channel k of every conv that has one (a max over convs needs values >= 0)."""
    width = max(len(v) for v in values)
    return torch.stack([torch.cat((v, v.new_zeros(width - len(v)))) for v in values])


def best_branch(values):
    """A unit's per-channel value from its convs' (C_i,) values (each >= 0): the largest."""
    return stack_unit(values).max(0).values


class PerConv(Criterion):
    """A per-conv value of each channel, normalised within its conv by `normalise`; a
    group scores a channel by its best branch."""

    def value(self, model, conv):
        return gamma_of(model, conv)

    def normalise(self, values):
        return values

    def scores(self, model, info, units, batches=None):
        return [best_branch([self.normalise(self.value(model, i)) for i in unit])
                for unit in units]


class Gamma(PerConv):
    """|gamma| as it is: comparable across layers only after long sparsity training."""
    name = 'gamma'
    default_cost = None
    default_max_layer_prune = None
    score_label = '|gamma|'


class Uniform(Criterion):
    """A channel's rank within its unit over the unit's width: every unit loses the same
    share."""
    name = 'uniform'

    def scores(self, model, info, units, batches=None):
        scores = []
        for unit in units:
            best = best_branch([gamma_of(model, i) for i in unit])
            rank = torch.empty_like(best)
            rank[best.argsort()] = torch.arange(1, len(best) + 1, dtype=best.dtype)
            scores.append(rank / len(best))
        return scores


class GammaMean(PerConv):
    name = 'gamma-mean'

    def normalise(self, g):
        return g / g.mean().clamp_min(1e-12)


class GammaMax(PerConv):
    name = 'gamma-max'

    def normalise(self, g):
        return g / g.max().clamp_min(1e-12)


class GammaL2(PerConv):
    name = 'gamma-l2'

    def normalise(self, g):
        return g / g.pow(2).mean().sqrt().clamp_min(1e-12)


class Lamp(PerConv):
    """LAMP on gamma^2: a channel's gamma^2 over the sum of those of its conv's channels
    that are not smaller."""
    name = 'lamp'

    def normalise(self, gamma):
        return _lamp(gamma)


def _lamp(gamma):
    squares = gamma ** 2
    order = squares.argsort()
    # for the k-th smallest: the sum of squares from it up to the largest
    tails = squares[order].flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = squares[order] / tails.clamp_min(1e-30)
    return scores


class Consumer(Criterion):
    """|gamma| times the channel's consumer reach (`consumer_reach`), summed over a
    group's convs."""
    name = 'consumer'

    def scores(self, model, info, units, batches=None):
        reach = consumer_reach(model, info, [i for unit in units for i in unit])
        return [stack_unit([gamma_of(model, i) * reach[i] for i in unit]).sum(0)
                for unit in units]


def consumer_reach(model, info, convs):
    """{conv: (C,)} the root sum of squares of the normalised weights that read each
    output channel of `convs`: what the consumer criterion multiplies |gamma| by."""
    wanted, energy = set(convs), {}  # (conv, channel) -> sum of squares
    for j, positions in input_positions(model, info):
        _, columns = consumer_columns(model, j)
        for p, origin in positions:
            for o in origin:
                if o[0] in wanted:
                    energy[o] = energy.get(o, 0.0) + float(columns[p])
    return {i: torch.tensor([energy.get((i, c), 0.0) for c in range(conv_width(model, i))]).sqrt()
            for i in sorted(wanted)}


class Taylor(Criterion):
    """First-order Taylor estimate of the loss change when a channel's gamma goes to 0."""
    name = 'taylor'
    needs_data = True

    def scores(self, model, info, units, batches=None):
        return _taylor_scores(model, units, batches)


def _taylor_scores(model, units, batches):
    """Mean over batches of (sum over a unit's convs of gamma * dL/dgamma)^2 per channel,
    with BatchNorm on its running statistics (the model is not changed)."""
    if not batches:
        raise ValueError('taylor needs calibration batches')
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bns = {i: model.module_list[i].BatchNorm2d for unit in units for i in unit}
    totals = [torch.zeros(max(len(gamma_of(model, i)) for i in unit)) for unit in units]
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


class FilterNorm(PerConv):
    """L1 norm of each channel's filter over its conv's mean (Li et al., ICLR 2017)."""
    name = 'filter-norm'

    def value(self, model, conv):
        weight = model.module_list[conv].Conv2d.weight.detach().float().cpu()
        return weight.abs().sum((1, 2, 3))  # (out,)

    def normalise(self, norms):
        return norms / norms.mean().clamp_min(1e-12)
