"""An exponential moving average of the weights: what validation, best.pt, the pruned-mAP
monitor and the saved checkpoints use, while the optimizer steps the live model.

    ema = ModelEMA(model)
    ...optimizer.step(); penalty.proximal_step(lr)
    ema.update()               # after every optimizer step, the sparsity step included
    evaluate(ema.module, ...)

A checkpoint saved from a `ModelEMA` (last.pt) holds the average as 'model', what test.py,
detect.py and the prune scripts read, and under 'ema' the live weights and the update
count that --resume needs; best.pt holds the average only.

The live weights move with every batch's noise; their average over the last few thousand
steps scores better and changes less from epoch to epoch. The decay starts near 0 and
ramps towards `decay` as decay * (1 - exp(-updates / tau)), so the first steps of a run
(when the average of random weights would mean nothing) pass through almost unchanged.

Sparsity training acts on the live model only: the L1 gradient and the proximal step push
the live gammas, and the average follows them. Its gammas are small where the live ones
are zero, not exactly zero; the prune scripts rank by size, which is all they need.

Every floating-point entry of the state dict is averaged: weights, biases and the
BatchNorm running statistics. Integer entries (BatchNorm's batch counts) are copied.
"""
import copy
import math

import torch

from utils.torch_utils import unwrap

DECAY = 0.9999      # the decay the ramp tends to
TAU = 2000          # optimizer steps over which the ramp rises by a factor 1 - 1/e


class ModelEMA:
    """The average (`module`, a copy of the model in eval mode, without gradients) of
    `live`, the model the optimizer steps, and the count of updates, which sets where
    the decay stands on its ramp."""

    def __init__(self, live, decay=None, tau=None):
        self.live = unwrap(live)
        self.module = copy.deepcopy(self.live).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = DECAY if decay is None else decay
        self.tau = TAU if tau is None else tau
        self.updates = 0

    def rate(self):
        """The decay the next `update` uses."""
        return self.decay * (1 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def update(self):
        """average = rate * average + (1 - rate) * live, entry by entry."""
        weight = 1 - self.rate()
        self.updates += 1
        live = self.live.state_dict()
        averaged, current = [], []
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                averaged.append(value)
                current.append(live[name].detach().to(value.dtype))
            else:
                value.copy_(live[name])
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)

    def resume_state(self):
        """What last.pt needs besides the average to go on: the live weights the
        optimizer was stepping and the update count."""
        return {'updates': self.updates, 'live_model': self.live.state_dict()}

    def load_resume_state(self, average, state):
        """Back to a saved run: `average` the checkpoint's 'model' entry, `state` its
        'ema' entry (None: a run saved without an average starts a fresh one)."""
        if state is not None:
            self.module.load_state_dict(average)
            self.updates = state['updates']


def live_weights(checkpoint):
    """The weights a resumed run trains on: the live ones where the checkpoint holds an
    average as 'model', else 'model'."""
    ema = checkpoint.get('ema')
    return ema['live_model'] if ema is not None else checkpoint['model']
