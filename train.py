"""Train a Darknet detector, optionally with sparsity training for channel pruning.

    python train.py --cfg cfg/yolov3-shapes.cfg --data data/shapes.data --epochs 30 \
        -sr --s 0.001 --prune 1 --output-dir runs/sparse

Sparsity training (-sr) adds an L1 penalty on the BatchNorm gammas of the convs a prune
mode will cut (--prune 0: normal/regular, 1: shortcut, 2: tiny): s * sign(gamma) joins
their gradients once per optimizer step; --penalty group|scaled, --proximal and --s-schedule
change how (utils/sparsity.py). With --target-params F (or --target-gmacs F,
--target-percent P) each epoch also reports the mAP of the model pruned to that target
(the prune script's defaults, BN recalibrated), logs it in results.csv, plots it in
pruned_map.png and keeps the best such checkpoint as best_pruned.pt. Several processes:
`torchrun --nproc_per_node=2 train.py ... --sparsity 0.001` (gloo on CPU, nccl on CUDA;
torchrun refuses the short --s); rank 0 evaluates and saves. Each epoch writes last.pt
(and best.pt, by mAP@0.5) and a row of results.csv; the run ends with a histogram of the
prunable gammas. --resume continues a stopped run; a fresh run into a folder that holds
another run's last.pt/best.pt is refused unless --exist-ok says to replace it.

--weights may come from another cfg (transfer learning): every conv whose shapes fit
--cfg is loaded, the rest (the heads, for another class count) re-initialised, and one
line says which. A Darknet file's layout is inferred (this cfg with another classes=,
or its first layers as `darknet partial` cuts them) or given by --weights-cfg:

    python train.py --cfg cfg/yolov3-hand.cfg --data data/hand.data --weights yolov3.weights

Fine-tuning a pruned model is training from its files, optionally taught by the model
it was pruned from (knowledge distillation, `utils/distill.py`):

    python train.py --cfg runs/prune/m-shortcut-0.8.cfg --weights runs/prune/m-shortcut-0.8.weights \
        --epochs 10 --teacher-cfg cfg/yolov3-shapes.cfg --teacher-weights sparse.pt
"""
import argparse
import contextlib
import csv
import io
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import Darknet, init_head_biases, transfer_weights, torch_load
from utils import demo
from utils.cli import check_classes, default_img_size, use_demo
from utils.datasets import create_dataloader
from utils.distill import distillation_loss, load_teacher
from utils.errors import ArgumentParser, UserInputError, run_cli
from utils.evaluate import evaluate
from utils.fileio import (atomic_output, atomic_write_text, output_lock, overwritten_input,
                          require_output_dir, resolved_inputs)
from utils.loss import compute_loss
from utils.parse_config import parse_data_cfg, require_data_key
from utils.plots import pyplot, save_figure
from utils.prune_cli import CALIBRATION_IMAGES, calibration_batches
from utils.prune_utils import SPARSITY_MODES, prunable_bn_modules, sparsity_report
from utils.sparsity import PENALTIES, S_SCHEDULES, TARGET_FLAGS, Monitor, Penalty
from utils.torch_utils import (barrier, count_parameters, distributed_cleanup,
                               distributed_setup, select_device, unwrap)

RESULT_COLUMNS = ('epoch', 'box', 'obj', 'cls', 'distill', 'loss', 'precision', 'recall', 'map50',
                  'map50_95', 'f1', 'lr', 'gammas_below_0.01', 'max_safe_percent', 'seconds',
                  'pruned_map50')


# ---------------------------------------------------------------- optimisation

def make_optimizer(model, lr, momentum, weight_decay, kind='sgd'):
    """SGD (Nesterov) or Adam, with weight decay on conv weights only: BN gammas/betas and
    biases get none (decay would act as a second, unasked-for sparsity penalty)."""
    decay, no_decay = [], []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            decay.append(module.weight)
            if module.bias is not None:
                no_decay.append(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            no_decay += [module.weight, module.bias]
    groups = [{'params': decay, 'weight_decay': weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    if kind == 'adam':
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def learning_rate(step, epoch, lr0, epochs, warmup_steps, schedule, final_ratio=0.01):
    """Per optimizer step: linear warm-up, then cosine (to lr0 * final_ratio) or steps."""
    if schedule == 'cos':
        lr = lr0 * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))
    else:  # Darknet's 'steps' policy at 80% and 90% of training
        lr = lr0 * 0.1 ** sum(epoch >= f * epochs for f in (0.8, 0.9))
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, optimizer, epoch, best_fitness, args, extra=None):
    """`extra`: more entries (the monitor's state, best_pruned.pt's pruned mAP)."""
    model = unwrap(model)
    checkpoint = {'epoch': epoch, 'best_fitness': best_fitness, 'model': model.state_dict(),
                  'optimizer': optimizer.state_dict(),
                  'cfg': {'hyperparams': model.hyperparams, 'layers': model.module_defs},
                  'args': {k: v for k, v in vars(args).items()
                           if isinstance(v, (str, int, float, bool, type(None)))},
                  **(extra or {})}
    with atomic_output(path) as f:
        torch.save(checkpoint, f)


def load_resume_checkpoint(path):
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: nothing to resume (no last.pt); start without --resume '
                             'or pass the --output-dir of the stopped run')
    checkpoint = torch_load(path, 'start the run again without --resume')
    if isinstance(checkpoint, dict) and {'model', 'optimizer'} <= set(checkpoint) \
            and 'cfg' not in checkpoint:
        # the ultralytics-era trainer (the seed project) saved no cfg and orders its
        # optimizer's parameter groups otherwise: its weights load, its run does not go on
        raise UserInputError(f'{path}: a checkpoint of the ultralytics-era train.py, which '
                             'this one cannot resume; start a new run from its weights: '
                             f'--weights {path} --output-dir <another folder>')
    if not isinstance(checkpoint, dict) or not {'epoch', 'model', 'optimizer', 'cfg'} <= set(checkpoint):
        raise UserInputError(f'{path}: not a train.py checkpoint; cannot resume from it')
    return checkpoint


def append_results(path, row):
    """Rewrite results.csv with one more row (atomically, so a kill leaves a whole file)."""
    old = open(path, encoding='utf-8').read() if os.path.isfile(path) else ''
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ','.join(RESULT_COLUMNS)
    first, _, rest = old.partition('\n')
    if header.startswith(first.rstrip('\r') + ','):
        # a run resumed from before a column was added: the new header, the old rows
        # (readers fill the missing last fields with empty values)
        old = header + '\n' + rest
    if not old:
        writer.writerow(RESULT_COLUMNS)
    writer.writerow([f'{row[k]:.6g}' if isinstance(row[k], float) else row[k]
                     for k in RESULT_COLUMNS])
    atomic_write_text(path, old + buffer.getvalue())


def trim_results(path, epochs):
    """Keep the header and the rows of epochs 1..`epochs` of results.csv: a run stopped
    after writing an epoch's row but before saving last.pt repeats that epoch on --resume."""
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8', newline='') as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= epochs]
    if kept != rows:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write_text(path, buffer.getvalue())


def plot_gamma_histogram(bn_modules, path, title):
    """Histogram of |gamma| over the prunable BN layers: what people read sparsity from."""
    plt = pyplot()
    gammas = torch.cat([bn.weight.detach().abs().cpu() for bn in bn_modules]).numpy()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(gammas, bins=100, color='tab:blue')
    axis.set_yscale('log')
    axis.set_xlim(left=0)
    axis.set_xlabel('|gamma| of prunable BatchNorm channels')
    axis.set_ylabel('channels')
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)


# ---------------------------------------------------------------- the run

class Stop(BaseException):
    """SIGTERM during training: save last.pt and leave. A BaseException, like
    KeyboardInterrupt, so that library code catching Exception cannot swallow it (tqdm
    does, when the signal lands while it starts its monitor thread)."""


def _raise_stop(signum, frame):
    raise Stop()


@contextlib.contextmanager
def signals_held():
    """Hold SIGTERM and Ctrl-C while the epoch's files are written, then act on them: an
    exception raised inside torch.save breaks its zip writer, which then raises its own
    RuntimeError in place of the Stop or KeyboardInterrupt."""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        raise KeyboardInterrupt() if held[0] == signal.SIGINT else Stop()


def build_model(args, device, checkpoint):
    if checkpoint is not None:  # the resumed run's own cfg, whatever --cfg says
        cfg = checkpoint['cfg']
        model = Darknet((cfg['hyperparams'], cfg['layers']))
        model.load_state_dict(checkpoint['model'])
    else:
        model = Darknet(args.cfg)
        img_size = default_img_size(model, args.img_size)
        if args.weights:  # transfer: the convs that fit, the rest fresh (heads: priors)
            summary = transfer_weights(model, args.weights, args.cutoff, args.weights_cfg,
                                       img_size)
            if int(os.environ.get('RANK', 0)) == 0:
                print(summary)
        else:
            init_head_biases(model, img_size)
    return model.to(device)


def frozen_parameters(model, layers, epoch, epochs):
    """Parameters of layers 0..`layers`-1 while `epoch` < `epochs` (--freeze), else []."""
    if not layers or epoch >= epochs:
        return []
    return [p for module in model.module_list[:layers] for p in module.parameters()]


@dataclass
class Run:
    """What one training run holds between epochs: built by `setup`, advanced by
    `run_epoch` and `commit_epoch`, closed by `finish`."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    model: nn.Module             # the model itself (checkpoints, evaluation)
    net: nn.Module               # what the steps run: `model`, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    loader: object               # this process's share of the training images
    dataset: object
    valid_loader: object         # rank 0 only
    options: dict                # the .data file
    img_size: int
    mode: str                    # the --prune set
    bn_modules: list             # the BatchNorms that set penalises
    teacher: object              # distillation teacher, or None
    checkpoint: object           # the --resume checkpoint, or None
    steps_per_epoch: int
    warmup_steps: int
    start_epoch: int = 0
    best_fitness: float = -1.0
    completed: int = -1          # the last epoch whose last.pt is written
    penalty: Penalty = None      # -sr
    monitor: Monitor = None      # --target-*: 'mAP if pruned now'

    @property
    def main_process(self):
        return self.rank == 0

    def path(self, name):
        return os.path.join(self.args.output_dir, name)


def train(args):
    """Train as `args` (get_args_parser) describe; returns the last epoch's metrics."""
    run = setup(args)
    epoch, metrics = epoch_loop(run)
    finish(run, epoch)
    return metrics


def setup(args):
    """Processes, model, data, optimizer and the resumed state: the Run before epoch 1."""
    device = select_device(args.device)
    rank, world = distributed_setup(device)
    if world > 1 and device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    os.makedirs(args.output_dir, exist_ok=True)
    last = os.path.join(args.output_dir, 'last.pt')
    checkpoint = load_resume_checkpoint(last) if args.resume else None

    torch.manual_seed(args.seed)
    model = build_model(args, device, checkpoint)  # a bad cfg is refused before any data work
    if args.data is None:
        args.data = demo.ensure_demo_data()
    options = parse_data_cfg(args.data)
    check_classes(model, options, args.data, 'the cfg', 'make a cfg with derive_cfg.py --classes')
    img_size = default_img_size(model, args.img_size)
    mode = SPARSITY_MODES[args.prune]
    teacher = (load_teacher(args.teacher_cfg, args.teacher_weights, model, device)
               if args.teacher_cfg else None)
    loader, dataset = create_dataloader(require_data_key(options, 'train', args.data), img_size,
                                        args.batch_size, options['classes'], augment=args.augment,
                                        workers=args.workers, stride=model.stride,
                                        shards=(rank, world, args.seed))
    valid_loader = None
    if rank == 0:
        valid_loader, _ = create_dataloader(require_data_key(options, 'valid', args.data),
                                            img_size, args.batch_size, options['classes'],
                                            rect=True, workers=args.workers, stride=model.stride)
    steps_per_epoch = math.ceil(len(loader) / args.accumulate)
    run = Run(args, device, rank, world, model,
              DistributedDataParallel(model) if world > 1 else model,
              make_optimizer(model, args.lr, args.momentum, args.weight_decay, args.optimizer),
              loader, dataset, valid_loader, options, img_size, mode,
              prunable_bn_modules(model, mode), teacher, checkpoint, steps_per_epoch,
              round(args.warmup_epochs * steps_per_epoch))
    if args.sr:
        add_sparsity(run)
    restore(run)
    if run.main_process:
        print(describe_run(run))
    return run


def add_sparsity(run):
    """The penalty and, with a --target-*, the monitor (its plan is made once here, so an
    unreachable target is refused before training)."""
    args, model = run.args, run.model
    target = monitor_target(args)
    if target is not None:
        score = lambda m: evaluate(m, run.valid_loader, run.options['classes'],
                                   progress=False).metrics['map50']
        load = lambda: calibration_batches(args.data, run.img_size, CALIBRATION_IMAGES,
                                           args.batch_size, model.stride, args.workers)
        run.monitor = Monitor(run.mode, *target, run.img_size, score, load, args.monitor_every)
        run.monitor.plan(model)
    run.penalty = Penalty(model, run.mode, args.penalty, args.s, args.proximal, args.s_schedule,
                          args.epochs, run.monitor and (lambda m: run.monitor.plan(m).masks))


def monitor_target(args):
    """(kind, value) of the --target-* flag given, or None."""
    return next(((kind, getattr(args, f'target_{kind}')) for kind in TARGET_FLAGS
                 if getattr(args, f'target_{kind}') is not None), None)


def restore(run):
    """The resumed epoch count, best mAP and optimizer state; results.csv trimmed to match
    (a fresh run, --exist-ok, starts its own)."""
    results = run.path('results.csv')
    if run.checkpoint is None:
        if run.main_process:
            trim_results(results, 0)
        return
    run.optimizer.load_state_dict(run.checkpoint['optimizer'])
    run.start_epoch = run.checkpoint['epoch'] + 1
    run.best_fitness = run.checkpoint['best_fitness']
    run.completed = run.start_epoch - 1
    if run.monitor is not None:
        run.monitor.load_state_dict(run.checkpoint.get('monitor'))
    if run.start_epoch >= run.args.epochs:
        raise UserInputError(f'{run.path("last.pt")}: the run already finished '
                             f'{run.start_epoch} epochs; raise --epochs to train longer')
    if run.main_process:
        trim_results(results, run.start_epoch)


def describe_run(run):
    args = run.args
    return (f'{args.cfg if run.checkpoint is None else run.path("last.pt")}: '
            f'{count_parameters(run.model) / 1e6:.2f}M parameters, {len(run.dataset)} training '
            f'images at {run.img_size}, {run.world} process(es), '
            f'epochs {run.start_epoch + 1}..{args.epochs}' +
            (f'; sparsity s={args.s} on {len(run.bn_modules)} BN layers ({run.mode} set), '
             f'penalty {args.penalty}{" (proximal)" if args.proximal else ""}, '
             f'{args.s_schedule} schedule' if args.sr else '') +
            (f'; monitoring {run.monitor.label} every {args.monitor_every} epoch(s)'
             if run.monitor is not None else '') +
            (f'; distilling from {args.teacher_cfg} (weight {args.distill_weight:g})'
             if run.teacher is not None else ''))


def epoch_loop(run):
    """Train the remaining epochs; SIGTERM or Ctrl-C saves last.pt with the epochs done
    and exits 130. Returns (last epoch, its metrics)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _raise_stop)
    epoch, metrics = run.start_epoch, {}
    try:
        for epoch in range(run.start_epoch, run.args.epochs):
            metrics = run_epoch(run, epoch)
            if run.main_process:
                metrics.update(epoch_end(run.model, run.valid_loader, run.options, run.mode))
                due = run.monitor is not None and run.monitor.due(epoch, run.args.epochs)
                metrics['pruned_map50'] = run.monitor.measure(run.model) if due else ''
                commit_epoch(run, epoch, metrics)
                print_epoch(epoch, run.args.epochs, metrics, run.monitor)
            barrier()
    except (KeyboardInterrupt, Stop):
        for s in previous:  # a second signal must not cut this save short
            signal.signal(s, signal.SIG_IGN)
        if run.main_process:  # an epoch in progress is repeated on --resume
            _save(run, 'last.pt', run.completed)
            print(f'stopped with {run.completed + 1} epoch(s) done; saved '
                  f'{run.path("last.pt")}; continue with --resume')
        raise SystemExit(130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        distributed_cleanup()
    return epoch, metrics


def commit_epoch(run, epoch, metrics):
    """The epoch's results row, best.pt when it improved, then last.pt. last.pt is written
    last: it commits the epoch. A run killed before it repeats the epoch on --resume,
    which drops the epoch's results row."""
    with signals_held():
        append_results(run.path('results.csv'), {'epoch': epoch + 1, **metrics})
        if metrics['map50'] > run.best_fitness:
            run.best_fitness = metrics['map50']
            _save(run, 'best.pt', epoch)
        pruned = metrics.get('pruned_map50', '')
        if pruned != '' and pruned > run.monitor.best:  # NaN (target out of reach) never is
            run.monitor.best = pruned
            _save(run, 'best_pruned.pt', epoch, {'pruned_map50': pruned})
        _save(run, 'last.pt', epoch)
        run.completed = epoch


def _save(run, name, epoch, extra=None):
    if run.monitor is not None:
        extra = {**(extra or {}), 'monitor': run.monitor.state_dict()}
    more = (extra,) if extra else ()  # none: the six-argument call tests stand in for
    save_checkpoint(run.path(name), run.model, run.optimizer, epoch, run.best_fitness, run.args,
                    *more)


def finish(run, epoch):
    """The gamma histogram and the closing line (rank 0)."""
    if not run.main_process:
        return
    plot = run.path('bn_gammas.png')
    if run.bn_modules:
        plot_gamma_histogram(run.bn_modules, plot, f'{os.path.basename(run.args.output_dir)}: '
                             f'{run.mode} set, epoch {epoch + 1}')
    written = [run.path('last.pt'), run.path('best.pt'), 'results.csv'] + (
        [plot] if run.bn_modules else [])
    if run.monitor is not None:
        written += plot_pruned_map(run)
    print('wrote ' + ', '.join(written))


def plot_pruned_map(run):
    """mAP and the monitor's pruned mAP per epoch, from results.csv (the whole run, also
    across --resume); returns the files written."""
    with open(run.path('results.csv'), encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f))
    epochs = [int(row['epoch']) for row in rows]
    plain = [float(row['map50']) for row in rows]
    pruned = [(int(row['epoch']), float(row['pruned_map50'])) for row in rows
              if row.get('pruned_map50')]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(epochs, plain, 'o-', label='mAP@0.5')
    if pruned:
        axis.plot(*zip(*pruned), 's-', label=f'{run.monitor.label} mAP@0.5 (BN recalibrated)')
    axis.set_xlabel('epoch')
    axis.set_ylabel('mAP@0.5')
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_title(f'{os.path.basename(run.args.output_dir)}: {run.mode} mode', fontsize=9)
    figure.tight_layout()
    path = run.path('pruned_map.png')
    save_figure(figure, path)
    written = [path]
    if os.path.isfile(run.path('best_pruned.pt')):
        written.insert(0, run.path('best_pruned.pt'))
    return written


def run_epoch(run, epoch):
    """One pass over the training data; returns the mean losses and the last lr."""
    args, model, optimizer, device = run.args, run.model, run.optimizer, run.device
    run.net.train()
    frozen = frozen_parameters(model, args.freeze, epoch, args.freeze_epochs)
    if frozen:  # frozen layers keep their BatchNorm statistics too
        for module in model.module_list[:args.freeze]:
            module.eval()
    run.loader.sampler.set_epoch(epoch)
    if run.penalty is not None:
        run.penalty.start_epoch(epoch)
    totals, batches, start = torch.zeros(5), 0, time.time()  # box obj cls distill total
    bar = tqdm(run.loader, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False,
               disable=not run.main_process)
    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    for i, (imgs, targets, _, _) in enumerate(bar):
        step = epoch * run.steps_per_epoch + i // args.accumulate
        lr = learning_rate(step, epoch, args.lr, args.epochs, run.warmup_steps, args.schedule)
        for group in optimizer.param_groups:
            group['lr'] = lr
        imgs, targets = imgs.to(device, non_blocking=True), targets.to(device)
        if args.multi_scale:  # a random side in [0.5, 1.5] x img_size, a multiple of the stride
            stride, img_size = model.stride, run.img_size
            low, high = max(1, img_size // 2 // stride), (img_size * 3 // 2) // stride
            size = int(torch.randint(low, high + 1, (1,), generator=generator)) * stride
            imgs = F.interpolate(imgs, size=(size, size), mode='bilinear', align_corners=False)
        heads = run.net(imgs)
        loss, items = compute_loss(heads, targets, model)
        distill = torch.zeros(1, device=device)
        if run.teacher is not None:
            with torch.no_grad():
                taught = run.teacher(imgs, raw=True)
            distill = args.distill_weight * distillation_loss(heads, taught).reshape(1)
            loss = loss + distill * imgs.shape[0]
        # DDP averages gradients over processes; scale back to the sum over all images
        (loss * run.world).backward()
        if (i + 1) % args.accumulate == 0 or i + 1 == len(run.loader):
            if run.penalty is not None:
                run.penalty.add_gradient()
            for p in frozen:  # the optimizer skips a parameter without a gradient
                p.grad = None
            optimizer.step()
            if run.penalty is not None:  # before zero_grad: frozen gammas have no gradient
                run.penalty.proximal_step(lr)
            optimizer.zero_grad()
        items = items.detach().cpu()
        distill = distill.detach().cpu()
        totals += torch.cat((items[:3], distill, items[3:] + distill))
        batches += 1
        bar.set_postfix(loss=f'{totals[4] / batches:.3f}', lr=f'{lr:.2g}')
    box, obj, cls, distill, total = (totals / max(batches, 1)).tolist()
    return {'box': box, 'obj': obj, 'cls': cls, 'distill': distill, 'loss': total, 'lr': lr,
            'seconds': time.time() - start}


def epoch_end(model, valid_loader, options, mode):
    result = evaluate(model, valid_loader, options['classes'], progress=False)
    sparsity = sparsity_report(model, mode)
    return {**result.metrics, 'gammas_below_0.01': sparsity['share_small'],
            'max_safe_percent': sparsity['max_safe_percent']}


def print_epoch(epoch, epochs, m, monitor=None):
    distill = f' distill {m["distill"]:.3f}' if m['distill'] else ''
    pruned = (f'  {monitor.label} mAP {m["pruned_map50"]:.3f} ({monitor.seconds:.1f} s)'
              if m.get('pruned_map50', '') != '' else '')
    print(f'epoch {epoch + 1}/{epochs}  loss {m["loss"]:.3f} (box {m["box"]:.3f} obj '
          f'{m["obj"]:.3f} cls {m["cls"]:.3f}{distill})  P {m["precision"]:.3f} R {m["recall"]:.3f} '
          f'mAP@0.5 {m["map50"]:.3f}{pruned}  gammas<0.01 {m["gammas_below_0.01"]:.1%}  '
          f'max safe prune {m["max_safe_percent"]:.1%}  {m["seconds"]:.0f} s', flush=True)


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', help='model definition (.cfg); default: the demo YOLOv3')
    parser.add_argument('--data', help='data set description (.data); default: the demo set')
    parser.add_argument('--weights', help='initial weights (.weights, .pt or a backbone file)')
    parser.add_argument('--cutoff', type=int, help='load only layers 0..N-1 of --weights, a '
                        'backbone file or a longer one (the N of darknet53.conv.74, '
                        'yolov3-tiny.conv.15)')
    parser.add_argument('--weights-cfg', metavar='CFG', help='the cfg a Darknet --weights file '
                        'was trained with, when its layout cannot be inferred (transfer '
                        'learning loads every conv that fits --cfg)')
    parser.add_argument('--freeze', type=int, default=0, metavar='N',
                        help='keep layers 0..N-1 fixed (weights and BN statistics) for the '
                        'first --freeze-epochs epochs')
    parser.add_argument('--freeze-epochs', type=int, default=1, metavar='E')
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--batch-size', type=int, default=16, help='images per step and process')
    parser.add_argument('--accumulate', type=int, default=1, help='batches per optimizer step')
    parser.add_argument('--img-size', type=int, help="training side in pixels (default: cfg's width)")
    parser.add_argument('--multi-scale', action='store_true', help='vary the size per batch, 0.5x-1.5x')
    parser.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                        help='random affine, HSV and flip augmentation')
    parser.add_argument('--optimizer', choices=('sgd', 'adam'), default='sgd')
    parser.add_argument('--lr', type=float, default=0.01, help='initial learning rate')
    parser.add_argument('--momentum', type=float, default=0.937)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--schedule', choices=('cos', 'step'), default='cos')
    parser.add_argument('--warmup-epochs', type=float, default=1.0)
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--workers', type=int, default=2, help='data loading processes')
    parser.add_argument('--output-dir', default='runs/train', help='folder for checkpoints and logs')
    parser.add_argument('--resume', action='store_true', help='continue from --output-dir/last.pt')
    parser.add_argument('--exist-ok', action='store_true', help='start a fresh run in an '
                        '--output-dir that holds another run, replacing its files')
    parser.add_argument('-sr', '--sr', action='store_true', help='sparsity training on BN gammas')
    # torchrun's own parser takes a bare --s for an ambiguous prefix of its options
    parser.add_argument('--s', '--sparsity', dest='s', type=float, default=0.001,
                        help='sparsity rate, L1 on gammas (under torchrun write --sparsity)')
    parser.add_argument('--prune', type=int, choices=(0, 1, 2), default=0,
                        help='gammas penalised: 0 normal/regular set, 1 shortcut set, 2 tiny set')
    parser.add_argument('--penalty', choices=PENALTIES, default='l1',
                        help='with -sr: l1 (s * |gamma|), group (group lasso over the convs of '
                        'a shortcut group, --prune 1) or scaled (|gamma| weighted by the '
                        'consumer criterion\'s reach); see docs/training.md')
    parser.add_argument('--proximal', action='store_true', help='with -sr: apply the penalty '
                        'as soft-thresholding after each optimizer step (exact zeros)')
    parser.add_argument('--s-schedule', choices=S_SCHEDULES, default='constant',
                        help='with -sr: constant; warmup (s ramps up over the first 20%% of '
                        'the epochs); decay (from half the epochs on, 1%% of s on the '
                        'channels a --target-* keeps)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-params', type=float, metavar='F',
                        help='with -sr: after each epoch, the mAP of the model pruned (the '
                        "prune script's defaults for --prune's mode, BN recalibrated) to "
                        'remove the share F of the parameters (0.6: 60%%); best_pruned.pt '
                        'keeps the best')
    target.add_argument('--target-gmacs', type=float, metavar='F',
                        help='the same, removing the share F of the multiply-accumulates')
    target.add_argument('--target-percent', type=float, metavar='P',
                        help="the same, cutting the share P of the prunable channels (the "
                        "prune scripts' --percent)")
    parser.add_argument('--monitor-every', type=int, default=1, metavar='K',
                        help='measure the --target-* every K epochs (and after the last)')
    parser.add_argument('--teacher-cfg', help='knowledge distillation from this model (the '
                        'unpruned one) while fine-tuning a pruned --cfg/--weights')
    parser.add_argument('--teacher-weights', help="the teacher's .weights or .pt")
    parser.add_argument('--distill-weight', type=float, default=1.0,
                        help='gain of the distillation loss (per image, like box/obj/cls)')
    parser.add_argument('--seed', type=int, default=0)
    return parser


def check_args(args):
    for name in ('epochs', 'batch_size', 'accumulate'):
        if getattr(args, name) < 1:
            raise UserInputError(f'--{name.replace("_", "-")} {getattr(args, name)}: use 1 or more')
    if args.s < 0 or args.lr <= 0:
        raise UserInputError('--s must be >= 0 and --lr > 0')
    if (args.teacher_cfg is None) != (args.teacher_weights is None):
        raise UserInputError('--teacher-cfg and --teacher-weights go together: pass both '
                             '(the unpruned model) or neither')
    if args.distill_weight < 0:
        raise UserInputError(f'--distill-weight {args.distill_weight}: must be >= 0')
    check_sparsity_args(args)
    if args.cfg is None:
        use_demo(args, weights=None, data=False)
    outputs = resolved_inputs(os.path.join(args.output_dir, n) for n in ('last.pt', 'best.pt'))
    if args.weights and overwritten_input(args.weights, outputs):
        raise UserInputError(f'--weights {args.weights} would be overwritten by this run; '
                             'copy it elsewhere or choose another --output-dir')
    check_transfer_args(args)


def check_sparsity_args(args):
    """The penalty, schedule and monitor flags belong to sparsity training (-sr)."""
    target = monitor_target(args)
    target = target and f'--target-{target[0]} {target[1]:g}'
    if not args.sr:
        given = [flag for flag, on in ((target, target), ('--penalty', args.penalty != 'l1'),
                                       ('--proximal', args.proximal),
                                       ('--s-schedule', args.s_schedule != 'constant')) if on]
        if given:
            raise UserInputError(f'{given[0]}: belongs to sparsity training; add -sr (and '
                                 '--s), or drop it')
    for kind in TARGET_FLAGS:
        value = getattr(args, f'target_{kind}')
        if value is not None and not 0 < value < 1:
            raise UserInputError(f'--target-{kind} {value}: must be in (0, 1), a share (0.6: 60%)')
    if args.monitor_every < 1:
        raise UserInputError(f'--monitor-every {args.monitor_every}: use 1 or more')
    if args.s_schedule == 'decay' and target is None:
        raise UserInputError('--s-schedule decay relaxes the penalty on the channels a target '
                             'keeps: pass --target-params, --target-gmacs or --target-percent')


def check_transfer_args(args):
    """--weights-cfg/--cutoff/--freeze make sense together, and a fresh run never
    replaces another run's checkpoints unasked."""
    if (args.weights_cfg or args.cutoff is not None) and not args.weights:
        raise UserInputError('--weights-cfg and --cutoff describe --weights: pass the '
                             'weights file too')
    if args.freeze < 0 or args.freeze_epochs < 0:
        raise UserInputError('--freeze and --freeze-epochs must be >= 0')
    taken = [n for n in ('last.pt', 'best.pt') if os.path.isfile(os.path.join(args.output_dir, n))]
    if taken and not (args.resume or args.exist_ok):
        raise UserInputError(f'{args.output_dir}: holds another run ({", ".join(taken)}); '
                             'continue it with --resume, replace it with --exist-ok, or '
                             'choose another --output-dir')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    require_output_dir(args.output_dir)
    # one run per folder; under torchrun only rank 0 writes, so only it takes the lock
    with output_lock(args.output_dir, enabled=os.environ.get('RANK', '0') == '0'):
        return train(args)


if __name__ == '__main__':
    run_cli(main)
