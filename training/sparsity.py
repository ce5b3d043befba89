"""Sparsity training: the penalty on BatchNorm gammas, its schedule, and the monitor.

1. Penalties (`Penalty`, --penalty), each written as a function of the gammas of the
   mode's prunable units (a unit: one conv, or a shortcut group whose convs share one
   mask, see pruning/graph.py), with per-channel factors f >= 0 held fixed for an
   epoch:
   - l1:     s * sum_c f_c |gamma_c|  (the original toolkit's; f = 1 unless `decay`);
   - group:  s * sum_units sum_c f_c sqrt(sum_{convs i of the unit} gamma_ic^2), group
     lasso: a channel of a shortcut group shrinks as one vector, so its branches reach 0
     together (for a one-conv unit it is |gamma|, so l1);
   - scaled: l1 with f_c = the channel's consumer reach (pruning/criteria.py's
     `consumer` criterion: the root sum of squares of the normalised weights that read
     it) over the mean reach of all penalised channels. The criterion ranks a channel by
     |gamma| * reach, so the penalty pushes hardest where the ranking says a channel
     matters least, and a layer's arbitrary BatchNorm scale (which the reach cancels)
     no longer decides how fast its gammas fall.
   Without --proximal the (sub)gradient joins the gradients after backward, once per
   optimizer step. With --proximal the penalty is applied after the optimizer step as
   its proximal operator at step size lr: soft-thresholding (group: block
   soft-thresholding), which leaves exact zeros.
2. Schedules (--s-schedule): `constant`; `warmup` ramps s up linearly over the first
   WARMUP_SHARE of the epochs; `decay` (tanluren's idea) divides the penalty on the
   channels the monitor's target keeps by 1 / DECAY_FACTOR from DECAY_START of the
   epochs on, re-planned every epoch, so the channels that will stay recover while the
   ones that will go keep shrinking.
3. The monitor (`Monitor`, --target-params/--target-gmacs/--target-percent): after an
   epoch, the plan the prune script of the mode makes with its default flags at that
   target (read from the model), the compact model (cut from a copy), BatchNorm
   recalibration on the prune scripts' default number of training images, and the
   validation mAP. The training model, its optimizer and every random number stream are
   left as they were.
"""
import contextlib
import math
import random
import time

import numpy as np
import torch

from pruning.calibration import recalibrate_bn
from pruning.criteria import consumer_reach, get_criterion, stack_unit
from pruning.graph import prunable_convs, prunable_units
from pruning.plan import safe_count
from pruning.selection import choose_plan
from pruning.settings import PruneSettings
from pruning.surgery import prune
from utils.errors import UserInputError

PENALTIES = ('l1', 'group', 'scaled')
S_SCHEDULES = ('constant', 'decay', 'warmup')
WARMUP_SHARE = 0.2   # warmup: s reaches its full value after this share of the epochs
DECAY_START = 0.5    # decay: from this share of the epochs on ...
DECAY_FACTOR = 0.01  # ... the channels the target keeps get this share of s
TARGET_FLAGS = {'params': '--target-params', 'gmacs': '--target-gmacs',
                'percent': '--percent'}


SPARSITY_MODES = {0: 'normal', 1: 'shortcut', 2: 'tiny'}  # train.py --prune


def prunable_bn_modules(model, mode):
    """The BatchNorm2d modules of `model` whose gammas `mode` prunes, in layer order."""
    channels = model.hyperparams.get('channels', 3)
    return [model.module_list[i].BatchNorm2d
            for i in prunable_convs(model.module_defs, mode, channels, name=model._name())]


def add_sparsity_gradient(bn_modules, s, factors=None):
    """The L1 penalty s * sum f * |gamma| on BN gammas: add s * f * sign(gamma) to their
    gradients (after backward); `factors` one (C,) tensor per module, or None (f = 1).
    Modules without a gradient (frozen) are left alone."""
    for n, bn in enumerate(bn_modules):
        if bn.weight.grad is not None:
            step = torch.sign(bn.weight.detach())
            if factors is not None:
                step = step * factors[n].to(step)
            bn.weight.grad.add_(step, alpha=s)


def sparsity_report(model, mode, small=0.01):
    """Share of the mode's prunable gammas under `small`, and the largest share of them
    that could be pruned without emptying a layer (or a shortcut group)."""
    info, units, _ = prunable_units(model, mode)
    if not units:
        return {'channels': 0, 'share_small': 0.0, 'max_safe_percent': 0.0}
    gamma = get_criterion('gamma')
    keys = gamma.scores(model, info, units)
    ordered = torch.cat(keys).sort().values  # a shortcut group's channel once
    return {'channels': len(ordered), 'share_small': float((ordered < small).float().mean()),
            'max_safe_percent': safe_count(ordered, keys) / len(ordered)}


# ---------------------------------------------------------------- penalties

def penalty_value(gammas, units, name, s, factors=None):
    """The penalty as written (module docstring), differentiable: `gammas` {conv: (C,)},
    `units` lists of convs, `factors` {conv: (C,)} or None (all 1; `group` reads the
    unit's widest conv's factors)."""
    total = 0
    for unit in units:
        # the widest conv's factors cover the group (a partial residual's narrower convs
        # have its first channels)
        f = factors[max(unit, key=lambda i: len(gammas[i]))] if factors else 1
        if name == 'group':
            norm = stack_unit([gammas[i] for i in unit]).pow(2).sum(0).sqrt()
            total = total + (f * norm).sum()
        else:
            for i in unit:
                fi = factors[i] if factors else 1
                total = total + (fi * gammas[i].abs()).sum()
    return s * total


def scaled_factors(model, info, units):
    """`scaled`'s factors: consumer reach over its mean over every penalised channel."""
    reach = consumer_reach(model, info, [i for unit in units for i in unit])
    mean = torch.cat(list(reach.values())).mean().clamp_min(1e-12)
    return {i: r / mean for i, r in reach.items()}


class Penalty:
    """The sparsity penalty of one run: `start_epoch` fixes s and the factors for the
    epoch, `add_gradient` runs after backward, `proximal_step` after optimizer.step."""

    def __init__(self, model, mode, name='l1', s=0.001, proximal=False, schedule='constant',
                 epochs=1, keep_masks=None):
        if name not in PENALTIES or schedule not in S_SCHEDULES:
            raise ValueError(f'unknown penalty {name!r} or schedule {schedule!r}')
        self.info, self.units, _ = prunable_units(model, mode)
        if name == 'group' and not any(len(unit) > 1 for unit in self.units):
            raise UserInputError(f'--penalty group: {mode} mode prunes no shortcut group of '
                                 f'{model._name()} (no channels summed across convs); use '
                                 '--prune 1 (shortcut) on a cfg with shortcuts, or --penalty l1')
        if schedule == 'decay' and keep_masks is None:
            raise ValueError('the decay schedule needs keep_masks (the target plan)')
        self.model, self.mode, self.name, self.s = model, mode, name, s
        self.proximal, self.schedule, self.epochs = proximal, schedule, epochs
        self.keep_masks = keep_masks  # model -> {conv: kept channels}, for decay
        self.bns = {i: model.module_list[i].BatchNorm2d  # in layer order
                    for i in sorted(i for unit in self.units for i in unit)}
        self.rate, self.factors = s, None

    def rate_at(self, epoch):
        """s for `epoch` (from 0) under the schedule; decay acts through the factors."""
        if self.schedule == 'warmup':
            return self.s * min(1.0, (epoch + 1) / max(1, round(WARMUP_SHARE * self.epochs)))
        return self.s

    def start_epoch(self, epoch):
        self.rate = self.rate_at(epoch)
        factors = (scaled_factors(self.model, self.info, self.units)
                   if self.name == 'scaled' else None)
        if self.schedule == 'decay' and epoch >= DECAY_START * self.epochs:
            masks = self.keep_masks(self.model)
            factors = factors or {i: torch.ones(bn.num_features) for i, bn in self.bns.items()}
            factors = {i: torch.where(masks[i], f * DECAY_FACTOR, f) for i, f in factors.items()}
        self.factors = factors

    def _factor(self, i, like):
        return None if self.factors is None else self.factors[i].to(like)

    def add_gradient(self):
        """The penalty's (sub)gradient added to the gammas' gradients; none under
        --proximal. Gammas without a gradient (frozen) are left alone."""
        if self.proximal:
            return
        if self.name != 'group':  # l1 and scaled: s * f * sign(gamma)
            factors = None if self.factors is None else [self.factors[i] for i in self.bns]
            add_sparsity_gradient(list(self.bns.values()), self.rate, factors)
            return
        with torch.no_grad():
            for unit in self.units:
                norm = self._group_norm(unit)
                for i in unit:
                    weight = self.bns[i].weight
                    if weight.grad is None:
                        continue
                    f = self._factor(i, weight)
                    # d/dg of f * sqrt(sum g^2) is f * g / norm (0 where the norm is 0)
                    step = weight / norm[:len(weight)].clamp_min(1e-30)
                    weight.grad.add_(step if f is None else f * step, alpha=self.rate)

    def _group_norm(self, unit):
        # a narrower conv of a partial residual has the group's first channels only
        return stack_unit([self.bns[i].weight.detach() for i in unit]).pow(2).sum(0).sqrt()

    def proximal_step(self, lr):
        """Under --proximal: gamma <- prox of lr * penalty, after the optimizer step.
        l1/scaled: sign(g) * max(|g| - lr s f, 0); group: g * max(0, 1 - lr s f / norm)."""
        if not self.proximal:
            return
        with torch.no_grad():
            for unit in self.units:
                live = [i for i in unit if self.bns[i].weight.grad is not None]
                if not live:
                    continue
                if self.name == 'group':
                    widest = max(unit, key=lambda i: self.bns[i].num_features)
                    factor = self._factor(widest, self.bns[widest].weight)
                    threshold = lr * self.rate * (1 if factor is None else factor)
                    norm = self._group_norm(unit)
                    shrink = (1 - threshold / norm.clamp_min(1e-30)).clamp_min(0)
                    for i in live:
                        weight = self.bns[i].weight
                        weight.mul_(shrink[:len(weight)])
                    continue
                for i in live:
                    weight = self.bns[i].weight
                    f = self._factor(i, weight)
                    threshold = lr * self.rate * (1 if f is None else f)
                    weight.copy_(weight.sign() * (weight.abs() - threshold).clamp_min(0))


# ---------------------------------------------------------------- the monitor

@contextlib.contextmanager
def rng_preserved():
    """Run a block without moving any random number stream the training reads: torch's
    (CPU and CUDA), numpy's and Python's. Iterating a DataLoader draws its base seed
    from torch's stream, so even an evaluation pass would shift the next epoch's."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class Monitor:
    """'mAP if pruned now' at one target: `kind` 'params', 'gmacs' (shares removed, as the
    prune scripts' --target-params/--target-gmacs) or 'percent' (their --percent).
    `score(model)` is the validation mAP@0.5; `batches` the recalibration images (loaded
    on first use, `load_batches()` -> list of (images, targets))."""

    def __init__(self, mode, kind, value, img_size, score, load_batches, every=1):
        self.mode, self.kind, self.value, self.every = mode, kind, value, every
        self.img_size, self.score, self.load_batches = img_size, score, load_batches
        self.batches = None
        self.percent = None  # the percent of the last plan: where the next search starts
        self.best = -1.0  # the best pruned mAP so far (best_pruned.pt)
        self.seconds = 0.0
        # the prune scripts' data-free defaults at this target: every epoch, cheaply
        settings = (PruneSettings(percent=value, allow_capped=True) if kind == 'percent'
                    else PruneSettings(target=(kind, value)))
        self.settings = settings.resolve(mode)

    @property
    def label(self):
        unit = {'params': '', 'gmacs': ' MACs', 'percent': ' of channels'}[self.kind]
        return f'pruned@{self.value:.0%}{unit}'

    def plan(self, model):
        """The prune script's plan for `model` at the target (its default flags, without a
        data criterion). A share target's search starts at the previous epoch's percent, a
        few steps from the answer."""
        plan = choose_plan(model, self.mode, self.settings, self.img_size, start=self.percent)
        self.percent = plan.percent
        return plan

    def due(self, epoch, epochs):
        return (epoch + 1) % self.every == 0 or epoch + 1 == epochs

    def measure(self, model):
        """mAP@0.5 of the compact model the target gives, BN recalibrated; `model` and
        every random stream untouched. NaN when the target cannot be met now."""
        start = time.perf_counter()
        with rng_preserved():
            if self.batches is None:
                self.batches = self.load_batches()
            try:  # planning reads the model; prune() folds into a copy of it
                plan = self.plan(model)
            except UserInputError:
                return math.nan
            _, compact = prune(model, plan)
            recalibrate_bn(compact, self.batches)
            result = float(self.score(compact))
        self.seconds = time.perf_counter() - start
        return result

    def state_dict(self):
        return {'kind': self.kind, 'value': self.value, 'mode': self.mode, 'best': self.best}

    def load_state_dict(self, state):
        """The best pruned mAP of the resumed run, when it monitored the same target."""
        if state and (state['kind'], state['value'], state['mode']) == (
                self.kind, self.value, self.mode):
            self.best = state['best']
