"""The YOLOv3 loss as it was before issue 26, kept verbatim as the slow second road that
tests/test_loss.py checks the vectorised darknet/loss.py against. Per-head loops, a
`nonzero` per head and host-side checks: correct, but it stalls a GPU. Do not optimise it.

The original docstring follows.

YOLOv3 training loss: assign targets to anchors, then box, objectness and class terms.

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
"""
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


def decode_boxes(raw, stride, scale_x_y, anchors, rows, cols):
    """Raw (m, 4) tx, ty, tw, th at cells (rows, cols) -> (m, 4) cx, cy, w, h in pixels,
    as the model decodes them (darknet.layers.decode_boxes), tw and th capped.

    `anchors` (m, 2) is each row's anchor in pixels, `stride` the head's (x, y) pixels
    per cell.
    """
    grid = torch.stack((cols, rows), 1).to(raw.dtype)  # (m, 2) x, y
    return decode_model_boxes(raw, grid, raw.new_tensor(stride), scale_x_y, anchors,
                              MAX_LOG_WH)


# ---------------------------------------------------------------------------- assignment

class Assigned(NamedTuple):
    """The (target, anchor) pairs of one head, m of them, as parallel tensors."""
    image: torch.Tensor     # (m,) long, index in the batch
    anchor: torch.Tensor    # (m,) long, index among the head's anchors
    row: torch.Tensor       # (m,) long, grid cell y
    col: torch.Tensor       # (m,) long, grid cell x
    target: torch.Tensor    # (m,) long, row of `targets`
    cls: torch.Tensor       # (m,) long, class
    box: torch.Tensor       # (m, 4) float, target cx, cy, w, h in input pixels


def _check_inputs(heads, targets, model):
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
    if len(targets):
        image, cls = targets[:, 0], targets[:, 1]
        if image.min() < 0 or image.max() >= heads[0].shape[0]:
            raise ValueError(f'targets: image indices {int(image.min())}..{int(image.max())} '
                             f'outside the batch of {heads[0].shape[0]}')
        num_classes = layers[0].num_classes
        if cls.min() < 0 or cls.max() >= max(num_classes, 1):
            raise UserInputError(f'labels hold classes {int(cls.min())}..{int(cls.max())}, '
                                 f'but the model has {num_classes} (0..{num_classes - 1}); '
                                 'check the label files or classes= in the cfg')


def build_targets(heads, targets, model, anchor_t=DEFAULT_HYP['anchor_t']):
    """The `Assigned` pairs of every head, cfg order, by the rule in the module docstring."""
    _check_inputs(heads, targets, model)
    layers = model.yolo_layers
    device, dtype = heads[0].device, torch.promote_types(heads[0].dtype, torch.float32)
    targets = targets.to(device=device, dtype=dtype)
    # every head covers the whole input: grid size times stride is the image size
    ny, nx = heads[0].shape[2:4]
    image_wh = torch.tensor([nx * layers[0].stride[0], ny * layers[0].stride[1]],
                            device=device)
    xy = targets[:, 2:4] * image_wh  # (n, 2) pixels
    wh = targets[:, 4:6] * image_wh
    anchors = [layer.anchors.to(device=device, dtype=dtype) for layer in layers]

    # best anchor of each target over all heads: IoU of the sizes on one centre
    all_anchors = torch.cat(anchors)  # (sum of A, 2)
    inter = torch.min(wh[:, None], all_anchors[None]).prod(2)  # (n, sum of A)
    union = wh.prod(1)[:, None] + all_anchors.prod(1)[None] - inter
    best = (inter / union.clamp(min=1e-12)).argmax(1)  # (n,)

    assigned, first = [], 0
    for head, layer, head_anchors in zip(heads, layers, anchors):
        num_anchors = len(head_anchors)
        ratio = wh[:, None] / head_anchors[None]  # (n, A, 2)
        match = torch.max(ratio, 1 / ratio).amax(2) < anchor_t  # (n, A); zero sizes fail
        mine = (best >= first) & (best < first + num_anchors)
        match[mine.nonzero(as_tuple=True)[0], best[mine] - first] = True
        first += num_anchors

        t, a = match.nonzero(as_tuple=True)
        grid_h, grid_w = head.shape[2:4]
        stride = xy.new_tensor(layer.stride)
        cell = (xy[t] / stride).floor().long()  # (m, 2) x, y
        col = cell[:, 0].clamp(0, grid_w - 1)   # a centre on the far edge (1.0) stays inside
        row = cell[:, 1].clamp(0, grid_h - 1)
        box = torch.cat((xy[t], wh[t]), 1)
        assigned.append(Assigned(targets[t, 0].long(), a, row, col, t,
                                 targets[t, 1].long(), box))
    return assigned


# ---------------------------------------------------------------------------- loss

def compute_loss(heads, targets, model, hyp=None):
    """(loss, items): loss = total * batch size to backprop, items = [box, obj, cls, total].

    `heads` the train-mode output of `model`, `targets` (n, 6) image, class, cx, cy, w, h
    (normalised), `hyp` overrides of DEFAULT_HYP. Works on the heads' device.
    """
    hyp = merge_hyp(hyp)
    layers = model.yolo_layers
    assigned = build_targets(heads, targets, model, hyp['anchor_t'])
    batch = heads[0].shape[0]
    balance = hyp['balance'] if hyp['balance'] is not None else [1.0] * len(heads)
    if len(balance) != len(heads):
        raise UserInputError(f'hyp balance has {len(balance)} weights but the model has '
                             f'{len(heads)} yolo heads; give one per head or None')
    smooth = hyp['label_smoothing']

    # half-precision heads (AMP) are scored in float32, float64 ones stay float64
    dtype = torch.promote_types(heads[0].dtype, torch.float32)
    zero = heads[0].new_zeros((), dtype=dtype)
    box_sum, num_pairs = zero, 0
    cls_sum, num_cls = zero, 0
    obj_terms = []
    for head, layer, pairs in zip(heads, layers, assigned):
        head = head.to(dtype)
        objectness_target = torch.zeros_like(head[..., 4])  # (B, A, H, W)
        m = len(pairs.target)
        if m:
            p = head[pairs.image, pairs.anchor, pairs.row, pairs.col]  # (m, 5 + C)
            anchors = layer.anchors.to(p.device, p.dtype)[pairs.anchor]  # (m, 2)
            predicted = decode_boxes(p[:, :4], layer.stride, layer.scale_x_y, anchors,
                                     pairs.row, pairs.col)
            box_sum = box_sum + (1 - bbox_iou(predicted, pairs.box, hyp['iou_type'])).sum()
            num_pairs += m

            quality = bbox_iou(predicted.detach(), pairs.box, 'iou').clamp(0, 1)
            score = (1 - hyp['obj_iou']) + hyp['obj_iou'] * quality
            _, num_anchors, grid_h, grid_w = objectness_target.shape
            flat = ((pairs.image * num_anchors + pairs.anchor) * grid_h + pairs.row) \
                * grid_w + pairs.col  # index into the (B, A, H, W) objectness targets
            objectness_target.view(-1).scatter_reduce_(0, flat, score, 'amax')

            if layer.num_classes:
                class_target = torch.full_like(p[:, 5:], smooth / 2)  # (m, C)
                class_target[torch.arange(m, device=p.device), pairs.cls] = 1 - smooth / 2
                cls_sum = cls_sum + F.binary_cross_entropy_with_logits(
                    p[:, 5:], class_target, reduction='sum')
                num_cls += class_target.numel()
        obj_terms.append(F.binary_cross_entropy_with_logits(head[..., 4], objectness_target))

    box = box_sum / max(num_pairs, 1)
    cls = cls_sum / max(num_cls, 1)
    weights = torch.tensor(balance, dtype=dtype, device=zero.device)
    obj = (torch.stack(obj_terms) * weights).sum() / weights.sum()
    box, obj, cls = box * hyp['box'], obj * hyp['obj'], cls * hyp['cls']
    total = box + obj + cls
    return total * batch, torch.stack((box, obj, cls, total)).detach()
