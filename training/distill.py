"""Knowledge distillation for fine-tuning a pruned model: the unpruned model teaches.

    teacher = load_teacher(cfg, weights, student, device)
    loss = hard_loss + weight * distillation_loss(student(imgs), teacher(imgs, raw=True)) * batch

The loss compares the raw heads cell by cell (the pruned model keeps every head's
shape, so the two line up exactly), each output as the teacher's own probability:
- objectness: KL divergence between the teacher's and the student's Bernoulli
  objectness, over every cell and anchor: the teacher also says where there is *no*
  object, and how sure it is, which hard labels cannot.
- classes: the same KL per class, weighted by the teacher's objectness, so background
  cells (where class scores mean nothing) do not count.
- box: squared error of the sigmoid xy offsets and of the log wh (the quantities the
  decode turns into a box), weighted by the teacher's objectness.
Each term is a weighted mean, so the result is per image like `compute_loss`'s items;
multiply by the batch size to match its `loss`. Bernoulli KL is binary cross-entropy
against the teacher's soft target minus the target's own entropy: it is 0 exactly when
the student matches the teacher.
"""
import torch
import torch.nn.functional as F

from darknet.model import Darknet
from darknet.weights import load_weights
from utils.errors import UserInputError


def bernoulli_kl(student_logits, teacher_logits):
    """KL(teacher || student) of Bernoulli variables given by logits, elementwise."""
    p = torch.sigmoid(teacher_logits)
    cross = F.binary_cross_entropy_with_logits(student_logits, p, reduction='none')
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, p, reduction='none')
    return cross - entropy


def distillation_loss(student_heads, teacher_heads):
    """Per-image distillation loss over all heads (raw (B, A, H, W, 5+C) tensors)."""
    obj_sum = cls_sum = box_sum = weight_sum = cells = 0.0
    for s, t in zip(student_heads, teacher_heads):
        t = t.detach()
        weight = torch.sigmoid(t[..., 4])
        obj_sum = obj_sum + bernoulli_kl(s[..., 4], t[..., 4]).sum()
        cells += t[..., 4].numel()
        if s.shape[-1] > 5:
            cls_sum = cls_sum + (bernoulli_kl(s[..., 5:], t[..., 5:]).mean(-1) * weight).sum()
        box = ((torch.sigmoid(s[..., :2]) - torch.sigmoid(t[..., :2])).pow(2).sum(-1)
               + (s[..., 2:4] - t[..., 2:4]).pow(2).sum(-1))
        box_sum = box_sum + (box * weight).sum()
        weight_sum = weight_sum + weight.sum()
    weight_sum = weight_sum.clamp(min=1e-6)
    return obj_sum / cells + (cls_sum + box_sum) / weight_sum


def load_teacher(cfg, weights, student, device):
    """The teacher in eval mode, frozen; refused unless its heads match the student's."""
    teacher = load_weights(Darknet(cfg), weights).to(device).eval().requires_grad_(False)
    mine = [(h.num_classes, tuple(h.anchors.flatten().tolist())) for h in student.yolo_layers]
    theirs = [(h.num_classes, tuple(h.anchors.flatten().tolist())) for h in teacher.yolo_layers]
    if mine != theirs:
        raise UserInputError(f'--teacher-cfg {cfg}: its [yolo] heads (classes, anchors) differ '
                             "from the student's; the teacher must be the model the student "
                             'was pruned from')
    strides = [s for s, layer in zip(student.layer_strides, student.module_defs)
               if layer['type'] == 'yolo']
    teacher_strides = [s for s, layer in zip(teacher.layer_strides, teacher.module_defs)
                       if layer['type'] == 'yolo']
    if strides != teacher_strides:
        raise UserInputError(f'--teacher-cfg {cfg}: its heads have strides {teacher_strides}, '
                             f"the student's {strides}; pass the unpruned model's cfg")
    return teacher
