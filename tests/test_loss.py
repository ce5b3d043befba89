"""The training loss: overlaps against a slow version, assignment against the written rule,
decoding against the model's own, the vectorised loss against the earlier per-head one
(tests/loss_reference.py), and a few hundred steps that must learn a box."""
import math
import os

import loss_reference
import pytest
import torch
from conftest import ROOT, TEST_CFGS, randomize_weights

from darknet.loss import bbox_iou, build_targets, compute_loss
from darknet.model import Darknet
from utils.errors import UserInputError

# One class, two heads (8x8 at stride 8, 4x4 at stride 16) with anchors far apart, and
# scale_x_y on the coarse head.
ONE_CLASS_CFG = """[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=24
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=32
size=3
stride=2
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=18
activation=linear

[yolo]
mask=3,4,5
anchors=4,4, 8,8, 12,12, 24,24, 40,40, 60,60
classes=1
num=6
scale_x_y=1.2

[route]
layers=-4

[convolutional]
batch_normalize=1
filters=24
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=18
activation=linear

[yolo]
mask=0,1,2
anchors=4,4, 8,8, 12,12, 24,24, 40,40, 60,60
classes=1
num=6
"""


@pytest.fixture
def one_class_cfg(tmp_path):
    path = tmp_path / 'one_class.cfg'
    path.write_text(ONE_CLASS_CFG)
    return str(path)


def _model(cfg, seed=0):
    return randomize_weights(Darknet(cfg), seed).train()


def _image(size, seed=0, batch=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- overlaps

def _slow_overlap(a, b, kind):
    """One pair of (cx, cy, w, h) boxes, straight from the definitions, in Python floats."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    iou = inter / union
    cw, ch = max(ax2, bx2) - min(ax1, bx1), max(ay2, by2) - min(ay1, by1)
    if kind == 'iou':
        return iou
    if kind == 'giou':
        return iou - (cw * ch - union) / (cw * ch)
    diou = iou - ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / (cw ** 2 + ch ** 2)
    if kind == 'diou':
        return diou
    v = 4 / math.pi ** 2 * (math.atan(b[2] / b[3]) - math.atan(a[2] / a[3])) ** 2
    return diou - v / (1 - iou + v) * v


@pytest.mark.parametrize('kind', ['iou', 'giou', 'diou', 'ciou'])
def test_overlaps_match_slow_per_box_version(kind):
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(200, 2, 2, generator=generator, dtype=torch.float64) * 40
    wh = torch.rand(200, 2, 2, generator=generator, dtype=torch.float64) * 30 + 0.5
    boxes = torch.cat((xy, wh), 2)  # (200, 2, 4): disjoint, overlapping, nested pairs
    boxes[0, 1] = boxes[0, 0]  # identical
    boxes[1, 1] = boxes[1, 0] * torch.tensor([1, 1, 0.5, 0.5], dtype=torch.float64)  # nested
    fast = bbox_iou(boxes[:, 0], boxes[:, 1], kind, eps=0)
    slow = torch.tensor([_slow_overlap(a.tolist(), b.tolist(), kind) for a, b in boxes],
                        dtype=torch.float64)
    assert torch.allclose(fast, slow, atol=1e-12)
    assert abs(fast[0] - 1) < 1e-12
    assert (slow <= 0).any() and (slow > 0.3).any()  # disjoint pairs and good overlaps


def test_giou_grows_as_disjoint_boxes_approach():
    # where IoU is 0 and gives no gradient, GIoU still says which way to move
    target = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    far, near = torch.tensor([[10.0, 0.0, 2.0, 2.0]]), torch.tensor([[4.0, 0.0, 2.0, 2.0]])
    assert bbox_iou(far, target, 'iou') == bbox_iou(near, target, 'iou') == 0
    assert bbox_iou(far, target, 'giou') < bbox_iou(near, target, 'giou') < 0
    assert abs(bbox_iou(far, target, 'giou').item() - (-8 / 12)) < 1e-6


# ---------------------------------------------------------------------------- assignment

def _slow_assignment(targets, model, anchor_t):
    """{(head, image, anchor, row, col, target)} by the module docstring's rule, one by one."""
    layers = model.yolo_layers
    stride_x, stride_y = layers[0].stride
    # the first head's grid times its stride is the image, whatever the head
    pairs, anchors = set(), [(h, a, aw, ah) for h, layer in enumerate(layers)
                             for a, (aw, ah) in enumerate(layer.anchors.tolist())]
    width, height = model.hyperparams['width'], model.hyperparams['height']
    for t, (image, _, cx, cy, w, h) in enumerate(targets.tolist()):
        w, h = w * width, h * height

        def size_iou(aw, ah):
            inter = min(w, aw) * min(h, ah)
            return inter / (w * h + aw * ah - inter)
        best = max(anchors, key=lambda anchor: size_iou(anchor[2], anchor[3]))[:2]
        for head, a, aw, ah in anchors:
            within = w > 0 and h > 0 and max(w / aw, aw / w, h / ah, ah / h) < anchor_t
            if within or (head, a) == best:
                sx, sy = layers[head].stride
                col = min(int(cx * width // sx), round(width / sx) - 1)
                row = min(int(cy * height // sy), round(height / sy) - 1)
                pairs.add((head, int(image), a, row, col, t))
    return pairs


def _pairs(assigned):
    return {(h, *(int(v[k]) for v in (p.image, p.anchor, p.row, p.col, p.target)))
            for h, p in enumerate(assigned) for k in range(len(p.target))}


@pytest.mark.parametrize('anchor_t', [4.0, 2.0, 1.0])
def test_assignment_matches_slow_rule(features_cfg, anchor_t):
    model = _model(features_cfg)
    heads = model(_image(64, batch=3))
    generator = torch.Generator().manual_seed(2)
    n = 60
    targets = torch.cat((torch.randint(0, 3, (n, 1), generator=generator).float(),
                         torch.randint(0, 2, (n, 1), generator=generator).float(),
                         torch.rand(n, 2, generator=generator),
                         torch.rand(n, 2, generator=generator) ** 2), 1)
    targets[0, 2:] = torch.tensor([1.0, 1.0, 0.01, 0.01])  # far edge, smaller than any anchor
    targets[1, 2:] = torch.tensor([0.0, 0.5, 1.0, 1.0])    # the whole image
    assigned = build_targets(heads, targets, model, anchor_t)
    expected = _slow_assignment(targets, model, anchor_t)
    assert _pairs(assigned) == expected
    assert {p[-1] for p in expected} == set(range(n))  # no target dropped
    for p in assigned:
        assert torch.equal(p.cls, targets[p.target, 1].long())
        assert torch.allclose(p.box, targets[p.target, 2:] * 64)


def test_small_target_goes_to_fine_head_large_to_coarse(one_class_cfg):
    model = _model(one_class_cfg)
    heads = model(_image(64))
    fine = min(range(2), key=lambda h: model.yolo_layers[h].stride[0])
    coarse = 1 - fine
    assert model.yolo_layers[fine].stride == (8.0, 8.0)
    small = [0, 0, 20.5 / 64, 40.5 / 64, 4 / 64, 2.5 / 64]  # 4x2.5 px: anchors 4 and 8
    large = [0, 0, 40 / 64, 24 / 64, 56 / 64, 60 / 64]      # anchors 24 (by 2.5x), 40, 60
    medium = [0, 0, 0.5, 0.5, 17 / 64, 17 / 64]             # 8, 12 and 24, 40, 60
    tiny = [0, 0, 0.5, 0.5, 0.5 / 64, 0.5 / 64]            # no anchor within 4x: best only
    assigned = build_targets(heads, torch.tensor([small, large, medium, tiny]), model)
    pairs = _pairs(assigned)
    assert {(h, a, r, c) for h, _, a, r, c, t in pairs if t == 0} == {(fine, 0, 5, 2),
                                                                      (fine, 1, 5, 2)}
    assert {(h, a, r, c) for h, _, a, r, c, t in pairs if t == 1} == {
        (coarse, 0, 1, 2), (coarse, 1, 1, 2), (coarse, 2, 1, 2)}
    assert {(h, a) for h, _, a, _, _, t in pairs if t == 2} == {
        (fine, 1), (fine, 2), (coarse, 0), (coarse, 1), (coarse, 2)}
    assert {(h, a, r, c) for h, _, a, r, c, t in pairs if t == 3} == {(fine, 0, 4, 4)}


# ---------------------------------------------------------------------------- loss terms

def _decoded_heads(model, heads):
    """The model's own eval-mode decoding of raw train-mode heads: (B, A, H, W, 5 + C)."""
    decoded = []
    for head, layer in zip(heads, model.yolo_layers):
        batch, anchors, ny, nx, outputs = head.shape
        raw = head.permute(0, 1, 4, 2, 3).reshape(batch, anchors * outputs, ny, nx)
        size = (ny * layer.stride[1], nx * layer.stride[0])
        layer.eval()
        decoded.append(layer(raw, size).view(batch, anchors, ny, nx, outputs))
        layer.train()
    return decoded


def test_target_equal_to_the_decoded_prediction_costs_no_box_loss(features_cfg):
    model = _model(features_cfg)
    with torch.no_grad():
        heads = [torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
                 for h in model(_image(64, batch=2))]
    # one cell per head; tw, th near 0 so the anchor is its box's best; tx far from 0 so
    # a decoding that dropped scale_x_y (1.1 on the first head) would miss
    picks = [(0, 1, 2, 3, 1), (1, 1, 0, 5, 6)]  # (head, image, anchor, row, col)
    for h, b, a, r, c in picks:
        heads[h][b, a, r, c, :4] = torch.tensor([2.0, -1.5, 0.05, -0.05])
    decoded = _decoded_heads(model, heads)
    targets = torch.tensor([[b, 1, *(decoded[h][b, a, r, c, :4] / 64).tolist()]
                            for h, b, a, r, c in picks])
    assigned = build_targets(heads, targets, model, anchor_t=1.0)
    assert _pairs(assigned) == {(*pick, t) for t, pick in enumerate(picks)}
    hyp = {'anchor_t': 1.0, 'box': 1.0, 'obj': 0.0, 'cls': 0.0}
    for kind in ('iou', 'giou', 'ciou'):
        _, items = compute_loss(heads, targets, model, {**hyp, 'iou_type': kind})
        assert items[0] < 1e-5
    moved = targets.clone()
    moved[:, 2] += 0.6 / 64  # 0.6 px: the error a missing scale_x_y would make
    _, items = compute_loss(heads, moved, model, hyp)
    assert items[0] > 1e-3


@pytest.mark.parametrize('order', [[0, 1, 2], [2, 1, 0]])
def test_objectness_target_is_the_iou_of_the_decoded_box(features_cfg, order):
    model = _model(features_cfg)
    heads = [h.detach() for h in model(_image(64, batch=2))]
    # the first two share cells and anchors: the larger IoU must win in either order
    targets = torch.tensor([[0, 0, 0.4, 0.6, 0.3, 0.25], [0, 1, 0.41, 0.61, 0.35, 0.2],
                            [1, 0, 0.8, 0.2, 0.1, 0.15]])[order]
    # second road: the objectness targets rebuilt from the model's own eval decoding
    bce = []
    for p, decoded, head in zip(build_targets(heads, targets, model),
                                _decoded_heads(model, heads), heads):
        expected = torch.zeros(head.shape[:4])
        for b, a, r, c, t in zip(p.image, p.anchor, p.row, p.col, p.target):
            iou = bbox_iou(decoded[b, a, r, c, :4], targets[t, 2:] * 64)
            expected[b, a, r, c] = max(expected[b, a, r, c], iou)
        assert expected.count_nonzero() >= 1
        bce.append(torch.nn.functional.binary_cross_entropy_with_logits(head[..., 4],
                                                                        expected))
    hyp = {'box': 0.0, 'cls': 0.0, 'obj': 1.0}
    _, items = compute_loss(heads, targets, model, hyp)
    assert torch.allclose(items[1], (bce[0] + bce[1]) / 2, rtol=1e-5)
    _, items = compute_loss(heads, targets, model, {**hyp, 'balance': [3.0, 1.0]})
    assert torch.allclose(items[1], (3 * bce[0] + bce[1]) / 4, rtol=1e-5)


def test_empty_targets_only_push_objectness_down(features_cfg):
    model = _model(features_cfg)
    heads = model(_image(64, batch=2))
    for h in heads:
        h.retain_grad()
    loss, items = compute_loss(heads, torch.zeros(0, 6), model)
    loss.backward()
    assert torch.isfinite(loss) and items[0] == 0 and items[2] == 0 and items[1] > 0
    assert torch.allclose(items[3] * 2, loss)
    for h in heads:
        assert (h.grad[..., 4] > 0).all()  # every objectness goes down
        assert (h.grad[..., :4] == 0).all() and (h.grad[..., 5:] == 0).all()


def test_one_class_term_is_finite_and_trains_the_class_towards_one(one_class_cfg):
    model = _model(one_class_cfg)
    heads = model(_image(64))
    targets = torch.tensor([[0, 0, 0.3, 0.6, 0.25, 0.4], [0, 0, 0.7, 0.2, 0.5, 0.3]])
    loss, items = compute_loss(heads, targets, model, {'cls': 1.0})
    assert torch.isfinite(loss) and torch.isfinite(items).all()
    # BCE against 1 is softplus(-logit), averaged over the assigned pairs
    logits = torch.cat([h[p.image, p.anchor, p.row, p.col, 5] for h, p in
                        zip(heads, build_targets(heads, targets, model))])
    assert torch.allclose(items[2], torch.nn.functional.softplus(-logits).mean(), rtol=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_loss_is_per_image_items_times_batch_size(features_cfg):
    model = _model(features_cfg)
    for module in model.modules():  # batch statistics would differ between B=1 and B=2
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    image = _image(64)
    one = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [0, 0, 0.7, 0.6, 0.6, 0.5]])
    two = torch.cat((one, one.clone().index_fill_(1, torch.tensor([0]), 1)))
    loss1, items1 = compute_loss(model(image), one, model)
    loss2, items2 = compute_loss(model(image.repeat(2, 1, 1, 1)), two, model)
    assert torch.allclose(items1, items2, rtol=1e-5)
    assert torch.allclose(loss2, 2 * loss1, rtol=1e-5)
    assert torch.allclose(loss1, items1[3])
    assert torch.allclose(items1[:3].sum(), items1[3])


def test_gradient_reaches_every_head(features_cfg):
    model = _model(features_cfg)
    heads = model(_image(64))
    for h in heads:
        h.retain_grad()
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.15, 0.2], [0, 0, 0.7, 0.6, 0.7, 0.6]])
    assigned = build_targets(heads, targets, model)
    assert all(len(p.target) for p in assigned)  # both heads hold a target
    compute_loss(heads, targets, model)[0].backward()
    for h, p in zip(heads, assigned):
        g = h.grad[p.image, p.anchor, p.row, p.col]  # (m, 5 + C)
        assert (g[:, :4].abs().sum(0) > 0).all()  # x, y, w, h
        assert (g[:, 4] != 0).all() and (g[:, 5:] != 0).all()
    head_convs = [model.module_list[i - 1].Conv2d for i, layer in enumerate(model.module_defs)
                  if layer['type'] == 'yolo']
    assert all(conv.weight.grad.abs().sum() > 0 for conv in head_convs)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_are_refused(features_cfg):
    model = _model(features_cfg)
    heads = model(_image(64))
    with pytest.raises(UserInputError, match='model has 2'):
        compute_loss(heads, torch.tensor([[0, 2, 0.5, 0.5, 0.1, 0.1]]), model)
    with pytest.raises(UserInputError, match='iou_type'):
        compute_loss(heads, torch.zeros(0, 6), model, {'iou_type': 'eiou'})
    with pytest.raises(UserInputError, match='2 yolo heads'):
        compute_loss(heads, torch.zeros(0, 6), model, {'balance': [1.0]})
    with pytest.raises(ValueError, match='train-mode'):
        compute_loss(heads[:1], torch.zeros(0, 6), model)
    with pytest.raises(ValueError, match='outside the batch'):
        compute_loss(heads, torch.tensor([[1, 0, 0.5, 0.5, 0.1, 0.1]]), model)


# ---------------------------------------------------------------------------- reference

REFERENCE_CFGS = ['one_class', 'features.cfg', 'route_groups2.cfg', 'cfg/yolov3-tiny.cfg',
                  'cfg/yolov4-tiny.cfg', 'cfg/yolov3.cfg']


def _cfg_model(name, one_class_cfg):
    if name == 'one_class':
        return Darknet(one_class_cfg).train()
    return Darknet(os.path.join(ROOT, name) if name.startswith('cfg/')
                   else os.path.join(TEST_CFGS, name)).train()


def _random_batch(model, batch, size, n, seed, dtype=torch.float32):
    """Random raw heads (leaves, 3x the unit spread, a few tw/th past the loss's cap) and
    n random targets, a quarter of them on the image border, for `model` at `size`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sets each yolo layer's stride for this size
        shapes = [h.shape[1:] for h in model(torch.zeros(1, 3, size, size))]
    heads = [3 * torch.randn(batch, *shape, generator=generator, dtype=dtype)
             for shape in shapes]
    heads[0][0, 0, 0, 0, 2:4] = 20.0  # exp(20) x anchor: capped, not inf
    classes = max(model.yolo_layers[0].num_classes, 1)
    xy = torch.rand(n, 2, generator=generator)
    border = torch.rand(n, 2, generator=generator) < 0.25
    xy[border] = torch.randint(0, 2, (int(border.sum()),), generator=generator).float()
    wh = torch.rand(n, 2, generator=generator) ** 2  # many small boxes, a few whole-image
    targets = torch.cat((torch.randint(0, batch, (n, 1), generator=generator).float(),
                         torch.randint(0, classes, (n, 1), generator=generator).float(),
                         xy, wh), 1)
    return [h.requires_grad_() for h in heads], targets


def _both_roads(heads, targets, model, hyp=None):
    """(loss, items, head gradients) of the new loss and of the reference."""
    results = []
    for loss_fn in (compute_loss, loss_reference.compute_loss):
        loss, items = loss_fn(heads, targets, model, hyp)
        results.append((loss, items, torch.autograd.grad(loss, heads)))
    return results


def _assert_same(new, old, rtol=1e-5, assigned=True):
    (loss, items, grads), (ref_loss, ref_items, ref_grads) = new, old
    assert torch.allclose(loss, ref_loss, rtol=rtol, atol=0)
    for term, ref_term in zip(items, ref_items):  # box, obj, cls, total
        assert torch.allclose(term, ref_term, rtol=rtol, atol=rtol * ref_items[3])
    for grad, ref_grad in zip(grads, ref_grads):  # every head
        scale = ref_grad.abs().max()
        assert torch.allclose(grad, ref_grad, rtol=rtol, atol=rtol * scale)
        assert (ref_grad[..., 4] != 0).all() and (ref_grad[..., :4] != 0).any() == assigned


@pytest.mark.parametrize('cfg', REFERENCE_CFGS)
def test_loss_matches_reference_on_random_batches(cfg, one_class_cfg):
    model = _cfg_model(cfg, one_class_cfg)
    for seed, (batch, n) in enumerate([(2, 25), (3, 60)]):
        heads, targets = _random_batch(model, batch, 64 if 'cfg/' not in cfg else 96, n, seed)
        _assert_same(*_both_roads(heads, targets, model))


@pytest.mark.parametrize('hyp', [
    {'anchor_t': 1.0}, {'anchor_t': 2.5, 'iou_type': 'giou', 'obj_iou': 0.0},
    {'iou_type': 'diou', 'label_smoothing': 0.1, 'balance': [4.0, 0.5]},
    {'iou_type': 'iou', 'obj_iou': 0.4, 'box': 1.0, 'cls': 2.0, 'obj': 0.3}])
def test_loss_matches_reference_for_every_setting(features_cfg, hyp):
    model = _model(features_cfg)
    heads, targets = _random_batch(model, 2, 64, 40, seed=5)
    _assert_same(*_both_roads(heads, targets, model, hyp))


def test_loss_matches_reference_in_float64_and_on_edge_cases(features_cfg):
    model = _model(features_cfg)
    heads, targets = _random_batch(model, 2, 64, 30, seed=6, dtype=torch.float64)
    _assert_same(*_both_roads(heads, targets, model), rtol=1e-10)
    heads, _ = _random_batch(model, 2, 64, 0, seed=7)
    empty = _both_roads(heads, torch.zeros(0, 6), model)
    _assert_same(*empty, assigned=False)
    assert empty[0][1][0] == 0 and empty[0][1][2] == 0
    # more targets than anchors: 40 boxes piled on one cell of one image, all four
    # corners and edges of the image, zero-sized boxes
    crowd = torch.tensor([[1, c % 2, 0.5 + 0.001 * c, 0.5, 0.1 + 0.01 * c, 0.2]
                          for c in range(40)])
    corners = torch.tensor([[0, 0, x, y, w, h] for x in (0.0, 1.0) for y in (0.0, 0.5, 1.0)
                            for w, h in ((1.0, 1.0), (0.05, 0.02), (0.0, 0.3))])
    _assert_same(*_both_roads(heads, torch.cat((crowd, corners)), model))


def test_loss_never_reads_a_tensor_value(features_cfg):
    # On the meta device tensors have shapes but no values: any .item(), nonzero, or
    # branch on a value raises, as it would stall a GPU. The reference does read them.
    model = _model(features_cfg).to('meta')
    heads = [h.detach().requires_grad_()
             for h in model(torch.zeros(2, 3, 64, 64, device='meta'))]
    targets = torch.zeros(7, 6, device='meta')
    loss, items = compute_loss(heads, targets, model)
    loss.backward()
    assert items.shape == (4,) and heads[0].grad.shape == heads[0].shape
    with pytest.raises((RuntimeError, NotImplementedError)):
        loss_reference.compute_loss([h.detach() for h in heads], targets, model)


# ---------------------------------------------------------------------------- training


def _top_detections(detections, k):
    """The k highest-objectness rows of (N, 5 + C) after greedy suppression at IoU 0.5."""
    kept = []
    for i in detections[:, 4].argsort(descending=True).tolist():
        if all(bbox_iou(detections[i, :4], detections[j, :4]) <= 0.5 for j in kept):
            kept.append(i)
            if len(kept) == k:
                break
    return detections[kept]


@pytest.mark.parametrize('cfg, targets', [
    ('one_class', [[0, 0, 0.35, 0.4, 0.3, 0.45]]),
    ('features.cfg', [[0, 1, 0.3, 0.4, 0.2, 0.3], [0, 0, 0.7, 0.65, 0.55, 0.45]]),
    ('route_groups2.cfg', [[0, 3, 0.3, 0.7, 0.25, 0.4], [0, 1, 0.7, 0.3, 0.45, 0.35]]),
])
def test_training_on_one_image_learns_its_boxes(cfg, targets, one_class_cfg, one_thread):
    model = _model(one_class_cfg if cfg == 'one_class' else os.path.join(TEST_CFGS, cfg))
    size = model.hyperparams['width']
    image, targets = _image(size, seed=10), torch.tensor(targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    losses = []
    for _ in range(300):
        loss, _ = compute_loss(model(image), targets, model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < losses[0] / 10

    # BN trained on this image's statistics: make them the running ones before eval
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    with torch.no_grad():
        model(image)
        model.eval()
        detections = model(image)[0]  # (N, 5 + C)
    truth = targets[:, 2:] * size
    # The most confident detections, one per object, are the objects: each lies on a
    # different target with IoU > 0.5 and its class, and all the rest rank below them.
    top = _top_detections(detections, len(truth))
    overlaps = bbox_iou(top[:, None, :4].expand(-1, len(truth), 4),
                        truth[None].expand(len(top), -1, 4))  # (k, objects)
    matched = overlaps.argmax(1)
    assert sorted(matched.tolist()) == list(range(len(truth)))
    assert (overlaps.max(1).values > 0.5).all()
    assert torch.equal(top[:, 5:].argmax(1), targets[matched, 1].long())
