"""What cutting a channel saves: its own weights and BatchNorm, plus every consumer
weight that reads it, in parameters or in multiply-accumulates at an input size. With a
cost, the planner cuts the least importance per parameter (or MAC) saved first.
"""
import torch

from pruning.graph import consumer_columns, conv_width, input_positions

COSTS = ('params', 'macs', 'latency')  # latency: pruning/latency.py's measured table


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
        width = max(conv_width(model, i) for i in unit)
        costs.append(torch.zeros(width, dtype=torch.float64))
        for i in unit:
            own = conv_width(model, i)
            costs[u][:own] += _own_cost(model, i, measure) * cells(i)
            for c in range(own):
                where[(i, c)] = (u, c)
    for j, positions in input_positions(model, info):
        count, _ = consumer_columns(model, j)
        for p, origin in positions:
            owners = {where.get(o) for o in origin}
            if len(owners) == 1 and None not in owners:
                u, c = owners.pop()
                costs[u][c] += float(count[p]) * cells(j)
    return [c.float() for c in costs]
