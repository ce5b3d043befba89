"""The stages of pipeline.py; cli/pipeline.py runs them in order, or skips those done.

Each stage is `function(ctx, done) -> dict`: `ctx` is cli.pipeline.Context, `done` the
results of the stages before it (what their done.json files hold). The dict, with the
stage's seconds added, becomes the stage's done.json, written last and atomically: a
stage cut before it runs again (training stages from their last.pt). Every stage works
at the run's one image size and evaluates as test.py does (rect batches of --batch-size,
score threshold 0.001, NMS IoU 0.5).
"""
import math
import os
import warnings

import torch

from cli import prune as prune_cli
from darknet.model import Darknet
from darknet.weights import load_weights
from deploy.onnx_export import export_onnx
from evaluation.evaluate import evaluate
from pruning.calibration import recalibrate_bn
from pruning.report import measure, write_outputs
from pruning.selection import choose_plan, describe_settings
from pruning.settings import CALIBRATION_IMAGES, HELD_OUT_IMAGES, PruneSettings
from pruning.surgery import prune
from training.checkpoints import plot_pruned_map
from training.engine import TrainSettings
from training.stopping import results_row, train_until
from utils.errors import UserInputError
from utils.torch_utils import select_device

FINAL_FILES = ('final.cfg', 'final.weights', 'final.onnx')
# the training recipe both training stages share: train.py's defaults but the learning
# rate (--lr); the sparsity stage adds the penalty docs/training.md found to close the gap
# to the unpruned mAP first (l1 at s 0.005 as a proximal step)
TRAINING = dict(cutoff=None, weights_cfg=None, freeze=0, freeze_epochs=1, accumulate=1,
                multi_scale=False, augment=True, optimizer='sgd', momentum=0.937,
                weight_decay=5e-4, schedule='cos', warmup_epochs=1.0, resume=False,
                exist_ok=True, sr=False, penalty='l1', proximal=False, s_schedule='constant',
                target_params=None, target_gmacs=None, target_percent=None, monitor_every=1,
                teacher_cfg=None, teacher_weights=None, distill_weight=1.0, amp=None, ema=True,
                cache=False)
SPARSITY = dict(sr=True, proximal=True)
TRAIN_MODE = {'regular': 'normal'}  # train.py --prune: regular penalises normal's set


def checkpoint_entries(path, *keys):
    """The `keys` of a train.py checkpoint, read without loading its tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    return [checkpoint.get(key) for key in keys]


def score_model(ctx, model):
    """mAP@0.5 and mAP@0.5:0.95 of `model` on the valid= list, as test.py measures them."""
    loader = ctx.data.valid_loader(ctx.img_size, ctx.args.batch_size, model.stride,
                                   ctx.args.workers)
    return evaluate(model, loader, ctx.data.classes, progress=False).metrics


def monitor_batches(ctx, stride):
    """The training images the sparsity monitor recalibrates on (the same ones)."""
    return ctx.data.training_batches(CALIBRATION_IMAGES, ctx.img_size, ctx.args.batch_size,
                                     stride, ctx.args.workers)


def pruned_at(ctx, model, share, batches):
    """`model` pruned to remove `share` of the target's measure as the sparsity monitor
    prunes (its data-free plan, BN recalibrated on `batches`, no fine-tuning): {'removed',
    'percent', 'params', 'macs', 'map50'}, or None where the mode cannot reach it."""
    settings = PruneSettings(target=(ctx.target[0], share)).resolve(ctx.mode)
    try:
        plan = choose_plan(model, ctx.mode, settings, ctx.img_size)
    except UserInputError:
        return None
    _, compact = prune(model, plan)
    recalibrate_bn(compact, batches)
    figures = measure(compact, ctx.img_size, lambda m: score_model(ctx, m))
    return {'removed': plan.removed, 'percent': plan.percent, 'params': figures['params'],
            'macs': figures['macs'], 'map50': figures['map50']}


def train_settings(ctx, **fields):
    """TrainSettings for a training stage: TRAINING, the run's flags, then `fields`."""
    args = ctx.args
    return TrainSettings(**{**TRAINING, 'data': args.data, 'batch_size': args.batch_size,
                            'img_size': ctx.img_size, 'lr': args.lr, 'device': args.device,
                            'workers': args.workers, 's': args.s, 'seed': args.seed,
                            'prune': TRAIN_MODE.get(ctx.mode, ctx.mode), **fields})


# ---------------------------------------------------------------- the stages

def evaluate_input(ctx, done):
    """Stage 1: the input model's figures."""
    model = ctx.model.to(select_device(ctx.args.device))
    figures = measure(model, ctx.img_size, lambda m: score_model(ctx, m))
    print(f'input: mAP@0.5 {figures["map50"]:.4f} at {ctx.img_size}x{ctx.img_size}, '
          f'{figures["params"] / 1e6:.3f}M parameters, {figures["macs"] / 1e9:.3f} GMACs')
    return {**figures, 'img_size': ctx.img_size}


def caught_up(row, base, tolerance):
    """The stop rule: the epoch's pruned mAP is at most `tolerance` below both its
    unpruned mAP and the input's (`base`). A skipped or unreachable measure is not."""
    pruned = row.get('pruned_map50')
    return (pruned is not None and not math.isnan(pruned)
            and pruned >= max(row['map50'], base) - tolerance)


def sparsity(ctx, done):
    """Stage 2: sparsity training with the monitor at the target, stopped by caught_up;
    none when the input, pruned as the monitor prunes, has caught up already."""
    folder, args = ctx.path('2-sparsity'), ctx.args
    kind, value = ctx.target
    base = done['1-evaluate']['map50']
    device = select_device(args.device)
    start = pruned_at(ctx, ctx.model.to(device).eval(), value,
                      monitor_batches(ctx, ctx.model.stride)) or {'map50': math.nan}
    row = {'map50': base, 'pruned_map50': start['map50']}
    print(f'the input pruned at the target (as the monitor prunes): mAP@0.5 '
          f'{start["map50"]:.4f} against {base:.4f} unpruned')
    if caught_up(row, base, args.tolerance):
        print(f'within {args.tolerance:g}: no sparsity training needed; stage 3 prunes the input')
        return {'weights': args.weights, 'epoch': 0, 'epochs': 0, 'stopped_early': True,
                'caught_up': True, 'map50': base, 'pruned_map50': start['map50']}
    settings = train_settings(ctx, cfg=args.cfg, weights=args.weights, output_dir=folder,
                              epochs=args.sparsity_epochs, **SPARSITY,
                              **{f'target_{kind}': value})
    print(f'sparsity training: s {args.s} (proximal), {ctx.mode} mode, at most '
          f'{args.sparsity_epochs} epochs; stops once the mAP pruned at the target is within '
          f'{args.tolerance:g} of the unpruned one and of the input\'s {base:.4f}')
    outcome = train_until(settings, lambda row: caught_up(row, base, args.tolerance))
    unit = '' if kind == 'params' else ' MACs'
    plot_pruned_map(folder, f'pruned@{value:.0%}{unit}', f'{os.path.basename(args.cfg)}: '
                    f'sparsity training, {ctx.mode} mode')
    kept = os.path.join(folder, 'best_pruned.pt')
    if not os.path.isfile(kept):  # the target was out of reach at every epoch
        kept = os.path.join(folder, 'best.pt')
        print(f'warning: no epoch could be pruned to the target; stage 3 prunes {kept}')
    epoch, = checkpoint_entries(kept, 'epoch')
    row = results_row(folder, epoch + 1)
    last = outcome['row'] or {}
    return {'weights': kept, 'epoch': epoch + 1, 'epochs': outcome['epochs'],
            'stopped_early': outcome['stopped'], 'caught_up': caught_up(last, base, args.tolerance),
            'map50': row['map50'], 'pruned_map50': row['pruned_map50']}


def prune_stage(ctx, done):
    """Stage 3: cli.prune.main on the kept sparse model at the target."""
    args, kind, value = ctx.args, *ctx.target
    argv = ['--cfg', args.cfg, '--weights', done['2-sparsity']['weights'], '--data', args.data,
            '--img-size', str(ctx.img_size), '--device', args.device, '--batch-size',
            str(args.batch_size), '--workers', str(args.workers), '--output-dir',
            ctx.path('3-prune'), '--exist-ok', f'--target-{kind}', str(value)]
    if ctx.train_images < CALIBRATION_IMAGES + HELD_OUT_IMAGES:
        # a small set: half calibrates, half scores the criterion's candidates
        argv += ['--calibrate', str(max(1, ctx.train_images // 2))]
    if args.latency is not None:
        argv.append('--latency' if args.latency else '--no-latency')
    report = prune_cli.main(ctx.mode, argv)
    plan, latency = report['plan'], report['latency'] or {}
    return {'cfg': report['cfg'], 'weights': report['weights'], 'widths': report['widths'],
            'criterion': describe_settings(plan.settings), 'percent': plan.percent,
            'removed': plan.removed, 'before': report['before'], 'after': report['after'],
            'latency': {name: {'original': t.first, 'pruned': t.second, 'ratio': t.ratio,
                               'spread': t.spread} for name, t in latency.items()
                        if t is not None}}


def finetune(ctx, done):
    """Stage 4: train the pruned model (taught by the stage 2 model with --distill)."""
    args, pruned = ctx.args, done['3-prune']
    teacher = ({'teacher_cfg': args.cfg, 'teacher_weights': done['2-sparsity']['weights']}
               if args.distill else {})
    folder = ctx.path('4-finetune')
    settings = train_settings(ctx, cfg=pruned['cfg'], weights=pruned['weights'],
                              output_dir=folder, epochs=args.finetune_epochs, **teacher)
    outcome = train_until(settings)
    best = os.path.join(folder, 'best.pt')
    epoch, fitness = checkpoint_entries(best, 'epoch', 'best_fitness')
    return {'cfg': pruned['cfg'], 'weights': best, 'epoch': epoch + 1,
            'epochs': outcome['epochs'], 'map50': fitness}


def finalize(ctx, done):
    """Stage 5: final.cfg + final.weights from the fine-tuned best.pt, evaluated from the
    files as written, and final.onnx checked by onnxruntime against them."""
    tuned = done['4-finetune']
    model = load_weights(Darknet(tuned['cfg']), tuned['weights'])
    cfg, weights, onnx = (ctx.path(name) for name in FINAL_FILES)
    write_outputs(model, cfg, weights, img_size=ctx.img_size)
    final = load_weights(Darknet(cfg), weights).eval()
    difference = export_onnx(final, onnx, ctx.img_size)
    figures = measure(final.to(select_device(ctx.args.device)), ctx.img_size,
                      lambda m: score_model(ctx, m))
    print(f'final: mAP@0.5 {figures["map50"]:.4f}, {figures["params"] / 1e6:.3f}M parameters; '
          f'onnxruntime vs PyTorch: {difference:.2e} of the output scale')
    return {**figures, 'onnx_difference': difference, 'files': [cfg, weights, onnx]}
