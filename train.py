"""Train a Darknet detector, optionally with sparsity training for channel pruning.

    python train.py --cfg cfg/yolov3-shapes.cfg --data data/shapes.data --epochs 30 \
        -sr --s 0.001 --prune 1 --output-dir runs/sparse

Sparsity training (-sr) adds an L1 penalty on the BatchNorm gammas of the convs a prune
mode will cut (--prune 0: normal/regular, 1: shortcut, 2: tiny): s * sign(gamma) joins
their gradients once per optimizer step. Several processes:
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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import Darknet, init_head_biases, transfer_weights, torch_load
from test import default_img_size, evaluate
from utils import demo
from utils.datasets import create_dataloader
from utils.distill import distillation_loss, load_teacher
from utils.errors import ArgumentParser, UserInputError, run_cli
from utils.fileio import atomic_output, atomic_write_text, output_lock, require_output_dir
from utils.loss import compute_loss
from utils.parse_config import parse_data_cfg, require_data_key
from utils.plots import pyplot, save_figure
from utils.prune_utils import (SPARSITY_MODES, add_sparsity_gradient, prunable_bn_modules,
                               sparsity_report)
from utils.torch_utils import (barrier, count_parameters, distributed_cleanup,
                               distributed_setup, select_device, unwrap)

RESULT_COLUMNS = ('epoch', 'box', 'obj', 'cls', 'distill', 'loss', 'precision', 'recall', 'map50',
                  'map50_95', 'f1', 'lr', 'gammas_below_0.01', 'max_safe_percent', 'seconds')


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

def save_checkpoint(path, model, optimizer, epoch, best_fitness, args):
    model = unwrap(model)
    checkpoint = {'epoch': epoch, 'best_fitness': best_fitness, 'model': model.state_dict(),
                  'optimizer': optimizer.state_dict(),
                  'cfg': {'hyperparams': model.hyperparams, 'layers': model.module_defs},
                  'args': {k: v for k, v in vars(args).items()
                           if isinstance(v, (str, int, float, bool, type(None)))}}
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

class Stop(Exception):
    """SIGTERM during training: save last.pt and leave."""


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
        img_size = args.img_size or model.hyperparams.get('width') or 416
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


def train(args):
    """Train as `args` (get_args_parser) describe; returns the last epoch's metrics."""
    device = select_device(args.device)
    rank, world = distributed_setup(device)
    if world > 1 and device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    main_process = rank == 0
    os.makedirs(args.output_dir, exist_ok=True)
    last, best = (os.path.join(args.output_dir, n) for n in ('last.pt', 'best.pt'))
    checkpoint = load_resume_checkpoint(last) if args.resume else None

    torch.manual_seed(args.seed)
    model = build_model(args, device, checkpoint)  # a bad cfg is refused before any data work
    if args.data is None:
        args.data = demo.ensure_demo_data()
    options = parse_data_cfg(args.data)
    if model.num_classes != options['classes']:
        raise UserInputError(f'{args.data}: classes={options["classes"]} but the cfg detects '
                             f'{model.num_classes}; make a cfg with derive_cfg.py --classes')
    img_size = default_img_size(model, args.img_size)
    mode = SPARSITY_MODES[args.prune]
    bn_modules = prunable_bn_modules(model, mode)
    teacher = (load_teacher(args.teacher_cfg, args.teacher_weights, model, device)
               if args.teacher_cfg else None)

    train_list = require_data_key(options, 'train', args.data)
    loader, dataset = create_dataloader(train_list, img_size, args.batch_size,
                                        options['classes'], augment=args.augment,
                                        workers=args.workers, stride=model.stride,
                                        shards=(rank, world, args.seed))
    valid_loader = None
    if main_process:
        valid_loader, _ = create_dataloader(require_data_key(options, 'valid', args.data),
                                            img_size, args.batch_size, options['classes'],
                                            rect=True, workers=args.workers, stride=model.stride)

    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay, args.optimizer)
    start_epoch, best_fitness = 0, -1.0
    results = os.path.join(args.output_dir, 'results.csv')
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        start_epoch, best_fitness = checkpoint['epoch'] + 1, checkpoint['best_fitness']
        if start_epoch >= args.epochs:
            raise UserInputError(f'{last}: the run already finished {start_epoch} epochs; '
                                 'raise --epochs to train longer')
        if main_process:
            trim_results(results, start_epoch)
    elif main_process:  # a fresh run (--exist-ok) starts its own results.csv
        trim_results(results, 0)
    net = DistributedDataParallel(model) if world > 1 else model
    steps_per_epoch = math.ceil(len(loader) / args.accumulate)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    if main_process:
        print(f'{args.cfg if checkpoint is None else last}: {count_parameters(model) / 1e6:.2f}M '
              f'parameters, {len(dataset)} training images at {img_size}, {world} process(es), '
              f'epochs {start_epoch + 1}..{args.epochs}' +
              (f'; sparsity s={args.s} on {len(bn_modules)} BN layers ({mode} set)'
               if args.sr else '') +
              (f'; distilling from {args.teacher_cfg} (weight {args.distill_weight:g})'
               if teacher is not None else ''))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _raise_stop)
    epoch, metrics, completed = start_epoch, {}, start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs):
            metrics = run_epoch(net, model, loader, optimizer, epoch, args, img_size,
                                bn_modules, steps_per_epoch, warmup_steps, world, device,
                                main_process, teacher)
            if main_process:
                metrics.update(epoch_end(model, valid_loader, options, mode))
                fitness = metrics['map50']
                # last.pt is written last: it commits the epoch. A run killed before it
                # repeats the epoch on --resume, which drops the epoch's results row.
                with signals_held():
                    append_results(results, {'epoch': epoch + 1, **metrics})
                    if fitness > best_fitness:
                        best_fitness = fitness
                        save_checkpoint(best, model, optimizer, epoch, best_fitness, args)
                    save_checkpoint(last, model, optimizer, epoch, best_fitness, args)
                    completed = epoch
                print_epoch(epoch, args.epochs, metrics)
            barrier()
    except (KeyboardInterrupt, Stop):
        for s in previous:  # a second signal must not cut this save short
            signal.signal(s, signal.SIG_IGN)
        if main_process:  # an epoch in progress is repeated on --resume
            save_checkpoint(last, model, optimizer, completed, best_fitness, args)
            print(f'stopped with {completed + 1} epoch(s) done; saved {last}; continue with '
                  '--resume')
        raise SystemExit(130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        distributed_cleanup()
    if main_process:
        plot = os.path.join(args.output_dir, 'bn_gammas.png')
        if bn_modules:
            plot_gamma_histogram(bn_modules, plot, f'{os.path.basename(args.output_dir)}: '
                                 f'{mode} set, epoch {epoch + 1}')
        print(f'wrote {last}, {best}, results.csv' + (f', {plot}' if bn_modules else ''))
    return metrics


def run_epoch(net, model, loader, optimizer, epoch, args, img_size, bn_modules,
              steps_per_epoch, warmup_steps, world, device, main_process, teacher=None):
    """One pass over the training data; returns the mean losses and the last lr."""
    net.train()
    frozen = frozen_parameters(model, args.freeze, epoch, args.freeze_epochs)
    if frozen:  # frozen layers keep their BatchNorm statistics too
        for module in model.module_list[:args.freeze]:
            module.eval()
    loader.sampler.set_epoch(epoch)
    totals, batches, start = torch.zeros(5), 0, time.time()  # box obj cls distill total
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False,
               disable=not main_process)
    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    for i, (imgs, targets, _, _) in enumerate(bar):
        step = epoch * steps_per_epoch + i // args.accumulate
        lr = learning_rate(step, epoch, args.lr, args.epochs, warmup_steps, args.schedule)
        for group in optimizer.param_groups:
            group['lr'] = lr
        imgs, targets = imgs.to(device, non_blocking=True), targets.to(device)
        if args.multi_scale:  # a random side in [0.5, 1.5] x img_size, a multiple of the stride
            stride = model.stride
            low, high = max(1, img_size // 2 // stride), (img_size * 3 // 2) // stride
            size = int(torch.randint(low, high + 1, (1,), generator=generator)) * stride
            imgs = F.interpolate(imgs, size=(size, size), mode='bilinear', align_corners=False)
        heads = net(imgs)
        loss, items = compute_loss(heads, targets, model)
        distill = torch.zeros(1, device=device)
        if teacher is not None:
            with torch.no_grad():
                taught = teacher(imgs, raw=True)
            distill = args.distill_weight * distillation_loss(heads, taught).reshape(1)
            loss = loss + distill * imgs.shape[0]
        # DDP averages gradients over processes; scale back to the sum over all images
        (loss * world).backward()
        if (i + 1) % args.accumulate == 0 or i + 1 == len(loader):
            if args.sr:
                add_sparsity_gradient(bn_modules, args.s)
            for p in frozen:  # the optimizer skips a parameter without a gradient
                p.grad = None
            optimizer.step()
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


def print_epoch(epoch, epochs, m):
    distill = f' distill {m["distill"]:.3f}' if m['distill'] else ''
    print(f'epoch {epoch + 1}/{epochs}  loss {m["loss"]:.3f} (box {m["box"]:.3f} obj '
          f'{m["obj"]:.3f} cls {m["cls"]:.3f}{distill})  P {m["precision"]:.3f} R {m["recall"]:.3f} '
          f'mAP@0.5 {m["map50"]:.3f}  gammas<0.01 {m["gammas_below_0.01"]:.1%}  '
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
    if args.cfg is None:
        args.cfg = demo.YOLOV3['cfg']
        args.img_size = args.img_size or demo.IMG_SIZE
    if args.weights and os.path.abspath(args.weights) in {
            os.path.abspath(os.path.join(args.output_dir, n)) for n in ('last.pt', 'best.pt')}:
        raise UserInputError(f'--weights {args.weights} would be overwritten by this run; '
                             'copy it elsewhere or choose another --output-dir')
    check_transfer_args(args)


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
