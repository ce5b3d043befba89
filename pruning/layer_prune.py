"""Layer pruning: remove whole residual blocks (depth), then optionally prune channels.

    python prune_layer.py --cfg CFG --weights SPARSE.pt --data DATA --layers 8 --percent 0.5

A residual block is a [shortcut] with linear activation that adds a branch, a chain of
convs, onto the block input (the layer its `from` names): out = input + branch(input).
Without the branch the block is the identity, so its layers can be deleted and every
reference to the shortcut pointed at the block input instead. No remaining conv changes
shape, so their weights are copied as they are.

1. `find_blocks`: every [shortcut], its branch, and why it cannot be removed, if so.
2. `rank_blocks`: the removable blocks, weakest first, by `block_score`.
3. `remove_blocks`: the layers without those blocks, every route/shortcut reference
   re-indexed, and a new model with the remaining weights copied.
4. `layer_prune`: 1-3 for the N weakest blocks, then, given a percent, shortcut-mode
   channel pruning of the result (pruning/plan.py, pruning/surgery.py), each step checked on itself.
prune_layer.py is its command: flags, the printed tables, the written files.
"""
import copy
from dataclasses import dataclass

import torch

from darknet.layers import layer_type, resolve_refs
from darknet.model import Darknet
from darknet.weights import conv_layers
from pruning.plan import plan_masks
from pruning.surgery import output_difference, prune
from utils.errors import UserInputError

# ---------------------------------------------------------------- blocks

@dataclass
class Block:
    """One [shortcut] and the branch it adds onto its `from` layer."""
    index: int          # ordinal among the model's [shortcut] layers
    shortcut: int       # layer index of the [shortcut]
    source: int         # the block input: the layer the branch is added onto
    score: float        # see block_score; None when the branch has no BN conv
    obstacle: str       # why removing the block would change the graph; None if it can go

    @property
    def layers(self):
        """The layers the block's removal deletes: its branch and its shortcut."""
        return list(range(self.source + 1, self.shortcut + 1))

    @property
    def removable(self):
        return self.obstacle is None


def block_score(model, convs):
    """Mean |gamma| of the branch's weakest BN conv (lower = weaker).

    The branch passes its input through each conv in turn, so a single conv whose gammas
    sparsity training drove to ~0 leaves the whole branch a near-constant, however large
    the other convs' gammas are: the branch is as strong as its weakest conv. Within a
    conv, the mean rather than the max, since removal takes every channel at once.
    The original toolkit scored the first conv alone; under its normal-mode sparsity
    training only that conv is penalised (the last one is tied to the shortcut), so it
    is the weakest one and this score agrees; under shortcut-mode sparsity every conv
    is penalised and any of them may be the weakest.
    """
    means = [float(model.module_list[i].BatchNorm2d.weight.detach().abs().mean())
             for i in convs if model.module_defs[i].get('batch_normalize', 0)]
    return min(means) if means else None


def _readers(layers):
    """{layer: [layers that name it in route `layers` or shortcut `from`]}."""
    readers = {}
    for j, layer in enumerate(layers):
        for target in layer_type(layer).sources(j, layer):
            readers.setdefault(target, []).append(j)
    return readers


def _obstacle(layers, shortcut, source, readers):
    """Why deleting layers source+1 .. shortcut and pointing the shortcut's readers at
    `source` would change more than the branch's contribution, or None."""
    activation = layers[shortcut].get('activation', 'linear')
    if activation != 'linear':
        return f'its sum is {activation}, not linear'
    if source == shortcut - 1:
        return 'no branch: from= is the previous layer'
    for k in range(source + 1, shortcut):
        if layers[k]['type'] != 'convolutional':
            return f'its branch holds a [{layers[k]["type"]}] (layer {k})'
        if readers.get(k):
            return f'layer {readers[k][0]} reads branch layer {k}'
    if not any(layers[k].get('batch_normalize', 0) for k in range(source + 1, shortcut)):
        return 'no BN conv in its branch to score'
    return None


def _partial(model, shortcut, source):
    """Why a partial residual cannot go: without its branch its width would change."""
    widths = model.out_channels
    if widths[source] != widths[shortcut]:
        return (f'a partial residual: layer {source} has {widths[source]} channels, the sum '
                f'{widths[shortcut]}')
    return None


def find_blocks(model):
    """Every [shortcut] of `model` as a Block, in layer order."""
    layers = model.module_defs
    readers = _readers(layers)
    blocks = []
    for s, layer in enumerate(layers):
        if layer['type'] != 'shortcut':
            continue
        source = resolve_refs(s, layer['from'])[0]
        obstacle = _obstacle(layers, s, source, readers) or _partial(model, s, source)
        branch_is_convs = all(layers[k]['type'] == 'convolutional' for k in range(source + 1, s))
        score = block_score(model, range(source + 1, s)) if branch_is_convs else None
        blocks.append(Block(len(blocks), s, source, score, obstacle))
    return blocks


def rank_blocks(model, blocks=None):
    """The removable blocks, weakest (lowest score) first; ties in layer order."""
    blocks = find_blocks(model) if blocks is None else blocks
    return sorted((b for b in blocks if b.removable), key=lambda b: (b.score, b.shortcut))


def default_layers(removable):
    """--layers when not given: a quarter of the removable blocks, at least one. Deep
    enough to matter (5 of YOLOv3's 23 blocks), shallow enough to fine-tune back."""
    return max(1, removable // 4)


# ---------------------------------------------------------------- removal

def renumber(layers, removed):
    """The layers without the `removed` blocks, and {old index: new index}.

    A removed shortcut maps to its block's input (that is what it computed without the
    branch), transitively through chained removed blocks; a branch layer maps nowhere,
    since nothing outside its block reads it. Each route/shortcut reference keeps its
    form: a relative (negative) one stays relative, an absolute one absolute.
    """
    sources = {b.shortcut: b.source for b in removed}
    gone = {i for b in removed for i in b.layers}
    new_index, kept = {}, []
    for i, layer in enumerate(layers):
        if i in sources:
            new_index[i] = new_index[sources[i]]
        if i in gone:
            continue
        new_index[i] = len(kept)
        layer = copy.deepcopy(layer)
        key = layer_type(layer).refs  # the key that holds layer indices
        if key:
            targets = [new_index[t] for t in resolve_refs(i, layer[key])]
            layer[key] = [t - new_index[i] if ref < 0 else t
                          for ref, t in zip(layer[key], targets)]
        kept.append(layer)
    return kept, new_index


def remove_blocks(model, shortcuts):
    """A new Darknet without the blocks whose [shortcut] layers are `shortcuts`, every
    remaining conv's weights and BN statistics copied exactly."""
    blocks = {b.shortcut: b for b in find_blocks(model)}
    removed = []
    for s in sorted(set(shortcuts)):
        if s not in blocks or not blocks[s].removable:
            why = blocks[s].obstacle if s in blocks else 'not a [shortcut]'
            raise ValueError(f'layer {s}: cannot remove this block ({why})')
        removed.append(blocks[s])
    layers, new_index = renumber(model.module_defs, removed)
    device = next(model.parameters()).device
    pruned = Darknet((copy.deepcopy(model.hyperparams), layers)).to(device)
    gone = {i for b in removed for i in b.layers}
    with torch.no_grad():
        for i, block in conv_layers(model):
            if i in gone:
                continue
            target = pruned.module_list[new_index[i]].state_dict()
            source = block.state_dict()
            assert source.keys() == target.keys(), (i, source.keys(), target.keys())
            for name, tensor in source.items():
                assert tensor.shape == target[name].shape, (i, name)
                target[name].copy_(tensor)
    pruned.seen = model.seen
    return pruned


def silenced_difference(model, pruned, removed, img_size):
    """`pruned` against `model` with each removed branch's output replaced by zeros:
    both compute input + 0 for those blocks, so they must agree up to rounding. Checks
    the re-indexing and the weight copy, not how much accuracy the removal costs."""
    hooks = [model.module_list[b.shortcut - 1].register_forward_hook(
        lambda module, inputs, output: torch.zeros_like(output)) for b in removed]
    training = model.training
    try:
        return output_difference(model, pruned, img_size)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)


# ---------------------------------------------------------------- depth, then width

@dataclass
class LayerPruneResult:
    blocks: list                # every [shortcut] block of the input model, in layer order
    ranking: list               # the removable blocks, weakest first
    removed: list               # the removed blocks, in layer order
    depth_model: Darknet        # the input model without the removed blocks
    depth_difference: float     # depth_model vs the input with those branches zeroed
    compact: Darknet            # the final model: depth_model, channel-pruned with a percent
    plan: object = None         # the channel step's PrunePlan (None without a percent)
    difference: float = None    # the channel step's compact vs keep-size model


def check_removable(model, blocks, layers):
    """Refuse a model without removable blocks, and a --layers it cannot satisfy."""
    name = model._name()
    if not blocks:
        raise UserInputError(f'{name}: has no [shortcut] layer, so no residual block to '
                             'remove; layer pruning is for YOLOv3-like models (prune '
                             'yolov3-tiny-like ones with prune_tiny.py)')
    removable = sum(b.removable for b in blocks)
    first = next((b for b in blocks if not b.removable), None)
    why = f'layer {first.shortcut}: {first.obstacle}' if first else ''
    if not removable:
        raise UserInputError(f'{name}: none of its {len(blocks)} [shortcut] blocks can be '
                             f'removed ({why}); prune channels with prune_shortcut.py')
    if layers < 1:
        raise UserInputError(f'--layers {layers}: must be at least 1 (prune_shortcut.py '
                             'prunes channels alone)')
    if layers > removable:
        others = (f' ({len(blocks) - removable} of its {len(blocks)} [shortcut] blocks cannot '
                  f'be removed, e.g. {why})' if first else '')
        raise UserInputError(f'--layers {layers}: {name} has {removable} removable residual '
                             f'blocks{others}; pass --layers {removable} or fewer')


def layer_prune(model, layers=None, percent=None, layer_keep=None, check_size=None):
    """Remove the `layers` weakest residual blocks of `model` (default: default_layers),
    then with `percent` prune that share of the remaining channels in shortcut mode.

    Self-checks, on one random check_size image (default 4x the model stride): the
    layer-pruned model against `model` with the removed branches zeroed, and the
    channel-pruned compact model against its keep-size twin. `model` is left unchanged.
    """
    blocks = find_blocks(model)
    removable = sum(b.removable for b in blocks)
    layers = default_layers(removable) if layers is None and removable else layers
    check_removable(model, blocks, layers)
    if layer_keep is not None and percent is None:
        raise UserInputError('--layer-keep applies to channel pruning: pass --percent too')
    check_size = check_size or 4 * model.stride
    ranking = rank_blocks(model, blocks)
    removed = sorted(ranking[:layers], key=lambda b: b.shortcut)
    depth = remove_blocks(model, [b.shortcut for b in removed]).eval()
    result = LayerPruneResult(blocks, ranking, removed, depth,
                              silenced_difference(model, depth, removed, check_size), depth)
    if percent is not None:
        result.plan = plan_masks(depth, 'shortcut', percent, layer_keep)
        keep_size, result.compact = prune(depth, result.plan)
        result.difference = output_difference(keep_size, result.compact, check_size)
    return result
