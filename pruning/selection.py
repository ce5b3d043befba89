"""How a prune run selects its plan from resolved settings (pruning/settings.py): one
criterion's global threshold (pruning/plan.py), the sensitivity allocation
(pruning/sensitivity.py), or `--criterion auto`, which builds the plan of every
candidate and keeps the one that detects best once pruned.

Auto exists because no fixed criterion wins on every model (benchmarks/criteria.py:
the one that leads on the demo models is the worst on a COCO-pretrained one). Each
distinct candidate plan is cut, its BatchNorm means recalibrated, and its mAP@0.5
measured on training images held apart from the calibration ones. A successive-halving
tournament bounds the cost: every candidate first on a quarter of the images, then the
best few on all of them.
"""
import dataclasses
import re
from dataclasses import dataclass

from terminaltables import AsciiTable

from evaluation.evaluate import evaluate
from pruning.calibration import recalibrate_bn
from pruning.plan import threshold_plan
from pruning.sensitivity import first_images, sensitivity_plan
from pruning.settings import AUTO
from pruning.surgery import prune
from utils.errors import UserInputError

FINALISTS = 3  # candidates scored on every held-out image in auto's second round


@dataclass
class Candidate:
    """One plan auto tried: the settings that gave it (several may give the same plan)
    and its held-out mAP@0.5 per round."""
    settings: list
    plan: object
    scores: list = dataclasses.field(default_factory=list)

    @property
    def label(self):
        return ', '.join(describe_settings(s) for s in self.settings)


def describe_settings(settings):
    """'lamp per params', 'gamma', 'lamp per params, sensitivity allocation'."""
    text = settings.criterion + ('' if settings.cost == 'none' else f' per {settings.cost}')
    return text + (', sensitivity allocation' if settings.allocate == 'sensitivity' else '')


def choose_plan(model, mode, settings, img_size, batches=None, start=None, held_out=None):
    """The plan resolved `settings` ask for. `batches` (training images as (images,
    targets)) feed data criteria, sensitivity curves and recalibration; `held_out`,
    more of them, score auto's candidates; `start`, a percent near the answer, speeds
    up a target search. Auto's plan carries `candidates`, what it tried."""
    if settings.criterion == AUTO:
        return auto_plan(model, mode, settings, img_size, batches, held_out)
    if settings.allocate == 'sensitivity':
        return sensitivity_plan(model, mode, settings, img_size, batches)
    return threshold_plan(model, mode, settings, img_size, batches, start)


def candidate_plans(model, mode, settings, img_size, batches):
    """Candidates with distinct masks, in the order settings.candidates lists them;
    a candidate whose target is out of reach is left out."""
    found, refusals = {}, []
    for tried in settings.candidates(mode, has_train=True):
        try:
            plan = choose_plan(model, mode, tried, img_size, batches)
        except UserInputError as error:
            refusals.append(str(error))
            continue
        key = tuple(bytes(plan.masks[i].numpy()) for i in sorted(plan.masks))
        found.setdefault(key, Candidate([], plan)).settings.append(tried)
    if not found:  # the refusal of the candidate that came closest
        raise UserInputError(max(refusals, key=_most_removed))
    return list(found.values())


def _most_removed(refusal):
    """The share a refusal says its candidate removes at most (0 when it says none)."""
    found = re.search(r'at most ([0-9.]+)%', refusal)
    return float(found.group(1)) if found else 0.0


def held_out_map(model, plan, calibration, held_out):
    """mAP@0.5 on `held_out` of `model` cut by `plan`, BN means recalibrated on
    `calibration` (none: as cut)."""
    compact = prune(model, plan)[1]
    if calibration:
        recalibrate_bn(compact, calibration)
    loader = [(imgs, targets, [None] * len(imgs), [_as_is(imgs)] * len(imgs))
              for imgs, targets in held_out]
    return evaluate(compact, loader, model.num_classes, progress=False).metrics['map50']


def _as_is(imgs):
    """The letterbox record of an image scored in its letterboxed pixels (a training
    batch keeps no record of the originals): its own size, scale 1, no padding."""
    height, width = imgs.shape[2:]
    return (height, width), (1.0, 1.0), (0.0, 0.0)


def auto_plan(model, mode, settings, img_size, batches, held_out):
    """The best candidate's plan (module docstring), carrying them all in `candidates`
    (best first) and the chosen settings in `settings`."""
    if not held_out:
        raise UserInputError('--criterion auto scores its candidates on training images: '
                             'pass --data with a train= list, or choose a --criterion')
    candidates = candidate_plans(model, mode, settings, img_size, batches)
    images = sum(len(imgs) for imgs, _ in held_out)
    recalibration = batches if settings.calibrate else None
    rounds = [(candidates, 4), (None, 1)] if len(candidates) > FINALISTS else [(candidates, 1)]
    for pool, fraction in rounds:
        pool = pool or sorted(candidates, key=_rank)[:FINALISTS]
        part = max(1, images // fraction)
        calib = first_images(recalibration, part) if recalibration else None
        for candidate in pool:
            candidate.scores.append(held_out_map(model, candidate.plan, calib,
                                                 first_images(held_out, part)))
    candidates.sort(key=_rank)
    best = candidates[0].plan
    best.candidates = candidates
    best.settings = candidates[0].settings[0]
    return best


def split_images(batches, count):
    """(the first `count` images of `batches`, the rest), both as batches."""
    first, rest, left = [], [], count
    for imgs, targets in batches or ():
        take = max(0, min(left, len(imgs)))
        if take:
            first.append((imgs[:take], targets[targets[:, 0] < take]))
        if take < len(imgs):
            later = targets[targets[:, 0] >= take].clone()
            later[:, 0] -= take
            rest.append((imgs[take:], later))
        left -= take
    return first, rest


def auto_table(plan, held_out):
    """What auto tried, best first: each distinct plan, the settings that gave it, its
    share removed and its held-out mAP@0.5 per round."""
    images = sum(len(imgs) for imgs, _ in held_out)
    rounds = max(len(c.scores) for c in plan.candidates)
    header = ['candidate (criterion, cost)', 'percent', 'removed'] + (
        [f'mAP@0.5, {max(1, images // 4)} images', f'mAP@0.5, {images} images'] if rounds == 2
        else [f'mAP@0.5, {images} images'])
    rows = [header]
    for c in plan.candidates:
        chosen = ' (chosen)' if c.plan is plan else ''
        removed = '' if c.plan.removed is None else f'{c.plan.removed:.1%}'
        rows.append([c.label + chosen, f'{c.plan.percent:.3f}', removed] +
                    [f'{s:.4f}' for s in c.scores] + [''] * (rounds - len(c.scores)))
    return AsciiTable(rows, 'criterion auto: held-out training images').table


def _rank(candidate):
    """Sort key: more rounds survived first, then the last round's mAP, higher first."""
    return -len(candidate.scores), -candidate.scores[-1]
