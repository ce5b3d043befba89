"""YOLOv3 training loss: assign targets to anchors, then box, objectness and class terms.

    model.train()
    loss, items = compute_loss(model(imgs), targets, model)   # items: box, obj, cls, total
    loss.backward()

Layout, top-down: hyperparameters, the IoU-family overlap of box pairs, the decoding of
raw head outputs (the same as `YOLOLayer`'s), target assignment, the loss.

Inputs. `heads` is what a Darknet model returns in train mode: one raw tensor per
[yolo] layer in cfg order, (B, A, H, W, 5 + C) = tx, ty, tw, th, objectness, classes.
`targets` is (n, 6) = image index in the batch, class, cx, cy, w, h, the box normalised
to the input image (0..1), as `data.datasets.collate_fn` builds it.

Assignment rule. Every target goes to the cell holding its centre, on every head, with
every anchor whose width and height ratios to the target's, taken whichever way round is
larger, are both below `anchor_t` (4.0: the anchor is within 4x of the box on each side).
A target no anchor passes (a box far smaller or larger than every anchor) still goes to
its one best anchor over all heads, by the IoU of the two sizes put on one centre, so no
target is dropped; `anchor_t` <= 1 keeps only that best anchor, Darknet YOLOv3's own
rule. No neighbouring cells: with Darknet's decoding a cell reaches only about its own
area (scale_x_y = 1.05 to 1.2 adds a few percent), so a neighbour could not place a
centre on the target anyway.

Terms, each a mean so it does not grow with the number of targets, cells or classes:
- box: 1 - CIoU (or IoU / GIoU / DIoU, `iou_type`) between the decoded box and the
  target, over every assigned (target, anchor) pair of every head. Boxes are compared in
  input pixels, decoded exactly as the model decodes them (scale_x_y included).
- obj: binary cross-entropy of the objectness logit of every cell and anchor. Its target
  is 0, except at assigned anchors, where it is the IoU of the decoded box with the
  target (detached; `obj_iou` = 1.0), so the objectness learns to rank by box quality and
  the best-placed anchor ends up the most confident; with `obj_iou` = 0 the target is 1.
  Two targets on one anchor and cell: the larger objectness target wins. One mean per
  head, then the heads' weighted mean (`balance`, equal by default).
- cls: binary cross-entropy of every class logit at assigned anchors against the one-hot
  class (label smoothing optional). With one class this trains that class's probability
  towards 1 on objects: well defined, and it keeps `objectness * class` scores honest.
  With no classes the term is 0.
No Darknet-style ignore threshold: every unassigned anchor's objectness is pushed to 0.

Scale. total = box * hyp['box'] + obj * hyp['obj'] + cls * hyp['cls'] is per image;
`loss` = total * batch size, so the gradient is that of a sum over the batch, as the
YOLOv3/YOLOv5 learning rates expect. `items` = [box, obj, cls, total], each with its gain,
detached, per image: `items[3] * batch_size == loss`.

How it runs. The step never waits for the device: no `.item()`, no `nonzero`, no branch
on a tensor's values. Every target is paired with every anchor of every head at once, a
dense (targets x anchors) table; the pairs the rule does not assign are computed and
masked out, which costs less than finding the assigned ones. The heads are read through
one autograd node (`_GatherHeads`) whose backward writes each head's gradient once.
tests/loss_reference.py keeps the earlier per-head implementation, and the tests check
this one against it.
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from darknet.layers import decode_boxes as decode_model_boxes
from utils.errors import UserInputError

# Gains as YOLOv5 ships them for these same means; YOLOv5 also multiplies obj by
# (image size / 640)^2 and cls by classes / 80, which is left to the caller. Keys outside
# this dict are ignored, so one hyp dict can serve the data loader and the loss.
DEFAULT_HYP = {
    'box': 0.05,            # gain of the box term, mean of 1 - CIoU
    'obj': 1.0,             # gain of the objectness term
    'cls': 0.5,             # gain of the class term
    'anchor_t': 4.0,        # an anchor takes a target if both side ratios are below this
                            # (<= 1: only the best anchor, YOLOv3's own one-anchor rule)
    'iou_type': 'ciou',     # box term overlap: 'iou', 'giou', 'diou' or 'ciou'
    'obj_iou': 1.0,         # objectness target at assigned anchors: 1 - r + r * IoU
    'label_smoothing': 0.0,  # class targets become 1 - e/2 and e/2
    'balance': None,        # objectness weight of each head, cfg order; None: all equal
}
IOU_TYPES = ('iou', 'giou', 'diou', 'ciou')
# exp(tw) beyond this would give inf widths and NaN overlaps; 1000x an anchor is no box.
MAX_LOG_WH = math.log(1000.0)


def merge_hyp(hyp=None):
    """DEFAULT_HYP updated with `hyp`, its values checked."""
    merged = dict(DEFAULT_HYP)
    merged.update({k: v for k, v in (hyp or {}).items() if k in DEFAULT_HYP})
    if merged['iou_type'] not in IOU_TYPES:
        raise UserInputError(f"hyp iou_type={merged['iou_type']!r} is not supported; use one "
                             f'of {", ".join(IOU_TYPES)}')
    if not merged['anchor_t'] > 0:
        raise UserInputError(f"hyp anchor_t={merged['anchor_t']} must be positive (4.0 is "
                             "usual; 1.0 keeps only each target's best anchor)")
    if not 0 <= merged['obj_iou'] <= 1 or not 0 <= merged['label_smoothing'] < 1:
        raise UserInputError('hyp obj_iou must be in [0, 1] and label_smoothing in [0, 1); got '
                             f"{merged['obj_iou']} and {merged['label_smoothing']}")
    for key in ('box', 'obj', 'cls'):
        if merged[key] < 0:
            raise UserInputError(f'hyp {key}={merged[key]} is a loss gain and must be >= 0')
    return merged


# ---------------------------------------------------------------------------- boxes

def bbox_iou(box1, box2, kind='iou', eps=1e-7):
    """Overlap of box pairs, elementwise: (..., 4) and (..., 4) cx, cy, w, h -> (...).

    'iou': intersection / union. 'giou': minus the share of the smallest enclosing box
    that the union leaves empty. 'diou': minus the squared centre distance over the
    enclosing box's squared diagonal. 'ciou': DIoU minus alpha * v, v measuring the
    aspect-ratio mismatch; alpha is a weight, held constant for the gradient as the
    CIoU paper prescribes. All in [-1, 1], 1 for identical boxes.
    """
    if kind not in IOU_TYPES:
        raise ValueError(f'kind={kind!r}: expected one of {IOU_TYPES}')
    x1, y1, w1, h1 = box1.unbind(-1)
    x2, y2, w2, h2 = box2.unbind(-1)
    left1, right1, top1, bottom1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    left2, right2, top2, bottom2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = ((torch.min(right1, right2) - torch.max(left1, left2)).clamp(min=0)
             * (torch.min(bottom1, bottom2) - torch.max(top1, top2)).clamp(min=0))
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if kind == 'iou':
        return iou
    enclose_w = torch.max(right1, right2) - torch.min(left1, left2)
    enclose_h = torch.max(bottom1, bottom2) - torch.min(top1, top2)
    if kind == 'giou':
        enclose = enclose_w * enclose_h + eps
        return iou - (enclose - union) / enclose
    diagonal2 = enclose_w ** 2 + enclose_h ** 2 + eps
    distance2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    diou = iou - distance2 / diagonal2
    if kind == 'diou':
        return diou
    v = (4 / math.pi ** 2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + 1 + eps)
    return diou - alpha * v



# ---------------------------------------------------------------------------- assignment

class AnchorTable(NamedTuple):
    """Every anchor of every head as one table, K = the anchors of all heads, cfg order,
    so that assignment and decoding run over all heads at once."""
    bounds: tuple           # (first, last) columns of each head in the K anchors
    sizes: tuple            # each head's B * A * H * W cells, for splitting objectness
    anchor: torch.Tensor    # (K,) long, index among its head's anchors
    num_anchors: torch.Tensor  # (K,) long, A of its head
    grid: torch.Tensor      # (K, 2) long, W and H of its head
    offset: torch.Tensor    # (K,) long, its head's first cell among all heads' cells
    stride: torch.Tensor    # (K, 2) float, x and y pixels per cell
    scale: torch.Tensor     # (K, 1) float, scale_x_y of its head
    image_wh: torch.Tensor  # (2,) float, the input's width and height in pixels


@functools.lru_cache(maxsize=64)
def _anchor_table(device, dtype, layout):
    """The `AnchorTable` of `layout`, one (B, A, H, W, stride x, stride y, scale_x_y) per
    head. Cached: it is made of Python numbers, and copying those to a GPU each step
    would wait for the GPU to finish the forward first."""
    bounds, sizes, anchor, num, grid, offset, stride, scale = [], [], [], [], [], [], [], []
    first = cells = 0
    for batch, a, h, w, sx, sy, s in layout:
        bounds.append((first, first + a))
        sizes.append(batch * a * h * w)
        anchor += range(a)
        num += [a] * a
        grid += [(w, h)] * a
        offset += [cells] * a
        stride += [(sx, sy)] * a
        scale += [(s,)] * a
        first, cells = first + a, cells + sizes[-1]
    _, _, h, w, sx, sy, _ = layout[0]  # every head covers the input: grid times stride
    long = lambda v: torch.tensor(v, dtype=torch.long, device=device)
    real = lambda v: torch.tensor(v, dtype=dtype, device=device)
    return AnchorTable(tuple(bounds), tuple(sizes), long(anchor), long(num), long(grid),
                       long(offset), real(stride), real(scale), real([w * sx, h * sy]))


def anchor_table(heads, model):
    layout = tuple((head.shape[0], layer.num_anchors, head.shape[2], head.shape[3],
                    float(layer.stride[0]), float(layer.stride[1]), float(layer.scale_x_y))
                   for head, layer in zip(heads, model.yolo_layers))
    dtype = torch.promote_types(heads[0].dtype, torch.float32)
    return _anchor_table(heads[0].device, dtype, layout)


class Assignment(NamedTuple):
    """Every (target, anchor) pair, n targets by K anchors of all heads, dense: `match`
    says which pairs the rule assigns; the rest are computed and masked out, which costs
    less than finding the assigned ones (a `nonzero` waits for the GPU)."""
    match: torch.Tensor     # (n, K) bool
    image: torch.Tensor     # (n,) long, index in the batch
    cls: torch.Tensor       # (n,) long, class
    box: torch.Tensor       # (n, 4) float, target cx, cy, w, h in input pixels
    row: torch.Tensor       # (n, K) long, grid cell y on the anchor's head
    col: torch.Tensor       # (n, K) long, grid cell x
    cell: torch.Tensor      # (n, K) long, index of (image, anchor, row, col) in its head's
                            # (B, A, H, W) cells


def assign(heads, targets, model, anchor_t, table):
    """The `Assignment` of `targets` by the rule in the module docstring."""
    dtype = table.stride.dtype
    targets = targets.to(device=table.stride.device, dtype=dtype)
    xy = targets[:, 2:4] * table.image_wh  # (n, 2) pixels
    wh = targets[:, 4:6] * table.image_wh
    anchors = torch.cat([layer.anchors for layer in model.yolo_layers]).to(xy)  # (K, 2)

    # best anchor of each target over all heads: IoU of the sizes on one centre
    inter = torch.min(wh[:, None], anchors[None]).prod(2)  # (n, K)
    union = wh.prod(1)[:, None] + anchors.prod(1)[None] - inter
    best = (inter / union.clamp(min=1e-12)).argmax(1)  # (n,)
    ratio = wh[:, None] / anchors[None]  # (n, K, 2)
    match = torch.max(ratio, 1 / ratio).amax(2) < anchor_t  # (n, K); zero sizes fail
    match.scatter_(1, best[:, None], True)

    cell = (xy[:, None] / table.stride).floor().long()  # (n, K, 2) x, y
    cell = torch.minimum(cell.clamp(min=0), table.grid - 1)  # a centre on the far edge stays in
    col, row = cell.unbind(2)
    image = targets[:, 0].long()
    flat = ((image[:, None] * table.num_anchors + table.anchor) * table.grid[:, 1] + row) \
        * table.grid[:, 0] + col
    return Assignment(match, image, targets[:, 1].long(), torch.cat((xy, wh), 1), row, col,
                      flat)


class Assigned(NamedTuple):
    """The (target, anchor) pairs of one head, m of them, as parallel tensors."""
    image: torch.Tensor     # (m,) long, index in the batch
    anchor: torch.Tensor    # (m,) long, index among the head's anchors
    row: torch.Tensor       # (m,) long, grid cell y
    col: torch.Tensor       # (m,) long, grid cell x
    target: torch.Tensor    # (m,) long, row of `targets`
    cls: torch.Tensor       # (m,) long, class
    box: torch.Tensor       # (m, 4) float, target cx, cy, w, h in input pixels


def build_targets(heads, targets, model, anchor_t=DEFAULT_HYP['anchor_t']):
    """The `Assigned` pairs of every head, cfg order: the assignment `compute_loss` uses,
    listed pair by pair to read or test (it finds the pairs, so it waits for a GPU)."""
    _check_inputs(heads, targets, model)
    table = anchor_table(heads, model)
    a = assign(heads, targets, model, anchor_t, table)
    assigned = []
    for first, last in table.bounds:
        t, anchor = a.match[:, first:last].nonzero(as_tuple=True)
        k = first + anchor
        assigned.append(Assigned(a.image[t], anchor, a.row[t, k], a.col[t, k], t, a.cls[t],
                                 a.box[t]))
    return assigned


def _check_inputs(heads, targets, model):
    """Shapes always; target values only where they are on the CPU, since reading a
    GPU tensor's values would stall the step (the data loader checks labels anyway)."""
    layers = model.yolo_layers
    if not isinstance(heads, (list, tuple)) or len(heads) != len(layers):
        raise ValueError(f'heads: expected the train-mode list of {len(layers)} raw head '
                         'tensors (call model.train() before the forward)')
    for i, (head, layer) in enumerate(zip(heads, layers)):
        if head.dim() != 5 or head.shape[1] != layer.num_anchors \
                or head.shape[4] != layer.num_outputs:
            raise ValueError(f'head {i}: shape {tuple(head.shape)}, expected (B, '
                             f'{layer.num_anchors}, H, W, {layer.num_outputs})')
        if layer.stride is None:
            raise ValueError(f'head {i}: the yolo layer has no stride yet; pass the heads of '
                             'a forward of this model')
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(f'targets: shape {tuple(targets.shape)}, expected (n, 6) rows of '
                         'image, class, cx, cy, w, h')
    if len(targets) and targets.device.type == 'cpu':
        check_target_values(targets, heads[0].shape[0], layers[0].num_classes)


def check_target_values(targets, batch, num_classes):
    """Image indices inside the batch and classes the model has."""
    image, cls = targets[:, 0], targets[:, 1]
    if image.min() < 0 or image.max() >= batch:
        raise ValueError(f'targets: image indices {int(image.min())}..{int(image.max())} '
                         f'outside the batch of {batch}')
    if cls.min() < 0 or cls.max() >= max(num_classes, 1):
        raise UserInputError(f'labels hold classes {int(cls.min())}..{int(cls.max())}, '
                             f'but the model has {num_classes} (0..{num_classes - 1}); '
                             'check the label files or classes= in the cfg')


# ---------------------------------------------------------------------------- loss

class _GatherHeads(torch.autograd.Function):
    """All heads' objectness logits, concatenated (cells,), and the whole output rows
    of every pair, (n, K, 5 + C), in one autograd node. Its backward writes each head's
    gradient once: zeros, the objectness column, the pairs' rows added. Indexing the
    heads twice instead has autograd build two dense head-sized gradients per head and
    add them, which on a CPU was nine tenths of the loss's time."""

    @staticmethod
    def forward(ctx, cell, bounds, *heads):
        ctx.save_for_backward(cell)
        ctx.bounds, ctx.shapes = bounds, [head.shape for head in heads]
        objectness = heads[0].new_empty(sum(head[..., 4].numel() for head in heads))
        start = 0
        for head in heads:  # one strided copy each (reshape, then cat, would be two)
            size = head[..., 4].numel()
            objectness[start:start + size].view(head.shape[:-1]).copy_(head[..., 4])
            start += size
        rows = torch.cat([head.reshape(-1, head.shape[-1])[cell[:, first:last]]
                          for head, (first, last) in zip(heads, bounds)], 1)
        return objectness, rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_objectness, grad_rows):
        cell, = ctx.saved_tensors
        grads, start = [], 0
        for shape, (first, last) in zip(ctx.shapes, ctx.bounds):
            grad = grad_rows.new_zeros(shape)
            size = grad[..., 4].numel()
            grad[..., 4] = grad_objectness[start:start + size].reshape(shape[:-1])
            grad.view(-1, shape[-1]).index_add_(0, cell[:, first:last].reshape(-1),
                                                grad_rows[:, first:last].reshape(-1, shape[-1]))
            grads.append(grad)
            start += size
        return (None, None, *grads)


def compute_loss(heads, targets, model, hyp=None):
    """(loss, items): loss = total * batch size to backprop, items = [box, obj, cls, total].

    `heads` the train-mode output of `model`, `targets` (n, 6) image, class, cx, cy, w, h
    (normalised), `hyp` overrides of DEFAULT_HYP. Works on the heads' device, scores in
    float32 (or float64 for float64 heads), and never waits for the device.
    """
    hyp = merge_hyp(hyp)
    _check_inputs(heads, targets, model)
    balance = hyp['balance'] if hyp['balance'] is not None else [1.0] * len(heads)
    if len(balance) != len(heads):
        raise UserInputError(f'hyp balance has {len(balance)} weights but the model has '
                             f'{len(heads)} yolo heads; give one per head or None')
    table = anchor_table(heads, model)
    a = assign(heads, targets, model, hyp['anchor_t'], table)
    dtype = table.stride.dtype
    objectness, rows = _GatherHeads.apply(a.cell, table.bounds, *heads)
    objectness, rows = objectness.to(dtype), rows.to(dtype)  # half-precision heads: float32

    anchors = torch.cat([layer.anchors for layer in model.yolo_layers]).to(rows)
    grid = torch.stack((a.col, a.row), 2).to(dtype)  # (n, K, 2) x, y
    predicted = decode_model_boxes(rows[..., :4], grid, table.stride, table.scale, anchors,
                                   MAX_LOG_WH)  # (n, K, 4) pixels
    truth = a.box[:, None].expand_as(predicted)
    pairs = a.match.sum().clamp(min=1)
    box = torch.where(a.match, 1 - bbox_iou(predicted, truth, hyp['iou_type']), 0).sum() / pairs

    quality = bbox_iou(predicted.detach(), truth, 'iou').clamp(0, 1)
    score = torch.where(a.match, (1 - hyp['obj_iou']) + hyp['obj_iou'] * quality, 0)
    # unassigned pairs score 0, which no target's maximum can lose to
    objectness_target = torch.zeros_like(objectness).scatter_reduce_(
        0, (a.cell + table.offset).view(-1), score.view(-1), 'amax')
    bce = F.binary_cross_entropy_with_logits(objectness, objectness_target, reduction='none')
    weight = sum(balance)
    obj = sum(part.mean() * (w / weight) for part, w in zip(bce.split(table.sizes), balance))

    cls = _class_term(rows[..., 5:], a, model.yolo_layers[0].num_classes,
                      hyp['label_smoothing'], pairs)
    box, obj, cls = box * hyp['box'], obj * hyp['obj'], cls * hyp['cls']
    total = box + obj + cls
    return total * heads[0].shape[0], torch.stack((box, obj, cls, total)).detach()


def _class_term(logits, a, num_classes, smooth, pairs):
    """Mean binary cross-entropy of the class logits (n, K, C) of assigned pairs against
    the one-hot class, smoothed; 0 for a model without classes."""
    if not num_classes:
        return logits.new_zeros(())
    onehot = torch.zeros_like(logits[:, 0]).scatter_(1, a.cls[:, None], 1.0)  # (n, C)
    target = (onehot * (1 - smooth) + smooth / 2)[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction='none').sum(2)
    return torch.where(a.match, bce, 0).sum() / (pairs * num_classes)
