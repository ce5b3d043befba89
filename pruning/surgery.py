"""Surgery: a plan's cut channels folded away, then removed.

A cut channel still outputs act(beta) (its gamma is ~0); that constant is followed
through the graph and folded into every conv that reads it (`pruned_constants`,
`fold_constants`), giving the keep-size model: same shapes, cut channels silent. The
compact model has the kept widths, weights copied by kept output and live input
indices (`compact_model`). The two must agree on any input (`output_difference`): the
self-check every prune run makes.
"""
import copy

import torch

from darknet.layers import ACTIVATIONS, ChannelValues, trace_channels
from darknet.model import Darknet


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
    channel is live, carried through every layer as its type says (darknet/layers.py)."""
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
