"""The training engine: a run is `setup` (model, data, optimizer, the resumed state) ->
`epoch_loop` (each epoch `run_epoch`, then evaluation, the sparsity monitor and
`commit_epoch`) -> `finish`. train.py turns its flags into `TrainSettings` and calls
`train`; sparsity penalties and the monitor are training/sparsity.py, distillation
training/distill.py, the average of the weights training/ema.py, the run's files
training/checkpoints.py.

Speed. With --amp (on by default on CUDA) the forward runs under autocast, in bfloat16
where the device has it, else float16 with a gradient scaler; the loss, the sparsity
gradient and proximal step, the optimizer and the checkpoints stay in float32. On CUDA
the model and the batches are channels-last. The step never waits for the device: the
loss terms are read back every `LossLog.EVERY` batches, and that read is where a
non-finite loss stops the run (nothing saved, last.pt keeps the last good epoch).
Running out of memory ends the run with one line naming the sizes that failed.
"""
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from darknet.loss import compute_loss
from darknet.model import Darknet
from darknet.transfer import init_head_biases, transfer_weights
from data.datasets import DataFile, check_classes, default_img_size
from evaluation.evaluate import evaluate
from pruning.settings import CALIBRATION_IMAGES
from training.checkpoints import (append_results, load_resume_checkpoint, plot_gamma_histogram,
                                  plot_pruned_map, save_checkpoint, trim_results)
from training.distill import distillation_loss, load_teacher
from training.ema import ModelEMA, live_weights
from training.sparsity import TARGET_FLAGS, Monitor, Penalty, prunable_bn_modules, sparsity_report
from utils.errors import UserInputError
from utils.fileio import signals_held
from utils.torch_utils import (barrier, count_parameters, distributed_cleanup, distributed_setup,
                               select_device)

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


# ---------------------------------------------------------------- precision, memory, losses

@dataclass
class Precision:
    """How the steps compute: the autocast type (None: float32 throughout), the gradient
    scaler (enabled for float16 only) and whether tensors are channels-last."""
    dtype: object
    scaler: object
    channels_last: bool

    def autocast(self, device):
        return torch.autocast(device.type, dtype=self.dtype or torch.bfloat16,
                              enabled=self.dtype is not None)


def choose_precision(amp, device):
    """--amp (None: on for CUDA, off on the CPU, where few kernels gain from it) ->
    Precision. bfloat16 keeps float32's range, so it needs no scaler; float16, on GPUs
    without bfloat16, does."""
    amp = device.type == 'cuda' if amp is None else amp
    dtype = None
    if amp:
        bf16 = device.type != 'cuda' or torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Precision(dtype, scaler, device.type == 'cuda')


OUT_OF_MEMORY = getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError)


@contextmanager
def memory_guard(settings, what, img_size):
    """Out of memory inside -> one line with the sizes that failed and what to try."""
    try:
        yield
    except OUT_OF_MEMORY:
        batch, accumulate = settings.batch_size, settings.accumulate
        smaller = (f'--batch-size {batch // 2} --accumulate {accumulate * 2}' if batch > 1
                   else '--batch-size 1')
        raise UserInputError(f'out of memory in {what} at --batch-size {batch}, --img-size '
                             f'{img_size}: try {smaller} (the same images per optimizer '
                             'step), or a smaller --img-size') from None


class LossLog:
    """An epoch's loss terms (box, obj, cls, distill, total per batch), kept on the device
    and read back every EVERY batches: each read waits for the device, so reading every
    batch would stall it. A read that finds a non-finite loss stops the run."""
    EVERY = 10

    def __init__(self, epoch, last_pt, completed):
        self.epoch, self.last_pt, self.completed = epoch, last_pt, completed
        self.pending, self.sums, self.batches = [], torch.zeros(5, dtype=torch.float64), 0

    def add(self, items, distill):
        """One batch's terms; True when this call read them back."""
        self.pending.append(torch.cat((items[:3], distill, items[3:] + distill)))
        if len(self.pending) >= self.EVERY:
            self.read()
            return True
        return False

    def read(self):
        if not self.pending:
            return
        rows = torch.stack(self.pending).double().cpu()  # (batches, 5), one wait
        self.pending = []
        finite = torch.isfinite(rows).all(1)
        if not finite.all():
            bad = int(finite.logical_not().nonzero()[0])
            kept = (f'{self.last_pt} keeps epoch {self.completed + 1}' if self.completed >= 0
                    else 'no checkpoint written')
            raise UserInputError(f'epoch {self.epoch + 1}, batch {self.batches + bad + 1}: the '
                                 f'loss is {rows[bad, 4].item()}; stopped without saving '
                                 f'({kept}); try a lower --lr or a longer --warmup-epochs')
        self.sums += rows.sum(0)
        self.batches += len(rows)

    def means(self):
        self.read()
        return (self.sums / max(self.batches, 1)).tolist()


# ---------------------------------------------------------------- the run

class Stop(BaseException):
    """SIGTERM during training: save last.pt and leave. A BaseException, like
    KeyboardInterrupt, so that library code catching Exception cannot swallow it (tqdm
    does, when the signal lands while it starts its monitor thread)."""


def _raise_stop(signum, frame):
    raise Stop()


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is told: train.py builds it from its flags (see its
    --help for each); the engine reads it and never changes it. `data` is a .data path."""
    cfg: str
    data: str
    weights: str
    cutoff: int
    weights_cfg: str
    freeze: int
    freeze_epochs: int
    epochs: int
    batch_size: int
    accumulate: int
    img_size: int
    multi_scale: bool
    augment: bool
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    device: str
    workers: int
    output_dir: str
    resume: bool
    exist_ok: bool
    sr: bool
    s: float
    prune: str               # the prune mode whose gammas -sr penalises
    penalty: str
    proximal: bool
    s_schedule: str
    target_params: float
    target_gmacs: float
    target_percent: float
    monitor_every: int
    teacher_cfg: str
    teacher_weights: str
    distill_weight: float
    seed: int
    amp: bool = None         # None: on for CUDA, off on the CPU
    ema: bool = True         # validate and save an average of the weights
    cache: bool = False      # decoded training images kept in memory

    @classmethod
    def from_namespace(cls, namespace):
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


def build_model(settings, device, checkpoint):
    if checkpoint is not None:  # the resumed run's own cfg, whatever --cfg says
        cfg = checkpoint['cfg']
        model = Darknet((cfg['hyperparams'], cfg['layers']))
        model.load_state_dict(live_weights(checkpoint))
    else:
        model = Darknet(settings.cfg)
        img_size = default_img_size(model, settings.img_size)
        if settings.weights:  # transfer: the convs that fit, the rest fresh (heads: priors)
            summary = transfer_weights(model, settings.weights, settings.cutoff,
                                       settings.weights_cfg, img_size)
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
    settings: TrainSettings
    device: torch.device
    rank: int
    world: int
    model: nn.Module             # the model itself (checkpoints, evaluation)
    net: nn.Module               # what the steps run: `model`, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    loader: object               # this process's share of the training images
    dataset: object
    valid_loader: object         # rank 0 only
    data: DataFile               # the .data file
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
    precision: Precision = None  # --amp, channels-last
    ema: ModelEMA = None         # the average of the weights (--ema)
    log: LossLog = None          # this epoch's losses

    @property
    def main_process(self):
        return self.rank == 0

    @property
    def average(self):
        """The weights validation, the monitor and the checkpoints use."""
        return self.model if self.ema is None else self.ema.module

    def path(self, name):
        return os.path.join(self.settings.output_dir, name)


def train(settings):
    """Train as `settings` (TrainSettings) say; returns the last epoch's metrics."""
    run = setup(settings)
    epoch, metrics = epoch_loop(run)
    finish(run, epoch)
    return metrics


def setup(settings):
    """Processes, model, data, optimizer and the resumed state: the Run before epoch 1."""
    device = select_device(settings.device)
    rank, world = distributed_setup(device)
    if world > 1 and device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    os.makedirs(settings.output_dir, exist_ok=True)
    last = os.path.join(settings.output_dir, 'last.pt')
    checkpoint = load_resume_checkpoint(last) if settings.resume else None

    torch.manual_seed(settings.seed)
    model = build_model(settings, device, checkpoint)  # a bad cfg: refused before data work
    precision = choose_precision(settings.amp, device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    data = DataFile(settings.data)
    check_classes(model, data.options, settings.data, 'the cfg',
                  'make a cfg with derive_cfg.py --classes')
    img_size = default_img_size(model, settings.img_size)
    mode = settings.prune
    teacher = (load_teacher(settings.teacher_cfg, settings.teacher_weights, model, device)
               if settings.teacher_cfg else None)
    if teacher is not None and precision.channels_last:
        teacher.to(memory_format=torch.channels_last)
    loader, dataset = data.train_loader(img_size, settings.batch_size, model.stride,
                                        settings.augment, settings.workers,
                                        shards=(rank, world, settings.seed),
                                        cache=settings.cache, pin_memory=device.type == 'cuda')
    valid_loader = None
    if rank == 0:
        valid_loader = data.valid_loader(img_size, settings.batch_size, model.stride, settings.workers)
    steps_per_epoch = math.ceil(len(loader) / settings.accumulate)
    run = Run(settings, device, rank, world, model,
              DistributedDataParallel(model) if world > 1 else model,
              make_optimizer(model, settings.lr, settings.momentum, settings.weight_decay, settings.optimizer),
              loader, dataset, valid_loader, data, img_size, mode,
              prunable_bn_modules(model, mode), teacher, checkpoint, steps_per_epoch,
              round(settings.warmup_epochs * steps_per_epoch), precision=precision,
              ema=ModelEMA(model) if settings.ema else None)
    if settings.sr:
        add_sparsity(run)
    restore(run)
    if run.main_process:
        print(describe_run(run))
    return run


def add_sparsity(run):
    """The penalty and, with a --target-*, the monitor (its plan is made once here, so an
    unreachable target is refused before training)."""
    settings, model = run.settings, run.model
    target = monitor_target(settings)
    if target is not None:
        score = lambda m: evaluate(m, run.valid_loader, run.data.classes,
                                   progress=False).metrics['map50']
        load = lambda: run.data.training_batches(CALIBRATION_IMAGES, run.img_size,
                                                 settings.batch_size, model.stride, settings.workers)
        run.monitor = Monitor(run.mode, *target, run.img_size, score, load, settings.monitor_every)
        run.monitor.plan(model)
    run.penalty = Penalty(model, run.mode, settings.penalty, settings.s, settings.proximal, settings.s_schedule,
                          settings.epochs, run.monitor and (lambda m: run.monitor.plan(m).masks))


def monitor_target(settings):
    """(kind, value) of the --target-* flag given, or None."""
    return next(((kind, getattr(settings, f'target_{kind}')) for kind in TARGET_FLAGS
                 if getattr(settings, f'target_{kind}') is not None), None)


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
    if run.ema is not None:
        run.ema.load_resume_state(run.checkpoint['model'], run.checkpoint.get('ema'))
    if run.monitor is not None:
        run.monitor.load_state_dict(run.checkpoint.get('monitor'))
    if run.start_epoch >= run.settings.epochs:
        raise UserInputError(f'{run.path("last.pt")}: the run already finished '
                             f'{run.start_epoch} epochs; raise --epochs to train longer')
    if run.main_process:
        trim_results(results, run.start_epoch)


def describe_run(run):
    settings = run.settings
    return (f'{settings.cfg if run.checkpoint is None else run.path("last.pt")}: '
            f'{count_parameters(run.model) / 1e6:.2f}M parameters, {len(run.dataset)} training '
            f'images at {run.img_size}, {run.world} process(es), '
            f'epochs {run.start_epoch + 1}..{settings.epochs}' +
            (f'; sparsity s={settings.s} on {len(run.bn_modules)} BN layers ({run.mode} set), '
             f'penalty {settings.penalty}{" (proximal)" if settings.proximal else ""}, '
             f'{settings.s_schedule} schedule' if settings.sr else '') +
            (f'; monitoring {run.monitor.label} every {settings.monitor_every} epoch(s)'
             if run.monitor is not None else '') +
            (f'; distilling from {settings.teacher_cfg} (weight {settings.distill_weight:g})'
             if run.teacher is not None else '') +
            (f'; {str(run.precision.dtype).replace("torch.", "")} autocast'
             if run.precision.dtype is not None else '') +
            ('; weights averaged (EMA)' if run.ema is not None else ''))


def epoch_loop(run):
    """Train the remaining epochs; SIGTERM or Ctrl-C saves last.pt with the epochs done
    and exits 130. Returns (last epoch, its metrics)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _raise_stop)
    epoch, metrics = run.start_epoch, {}
    try:
        for epoch in range(run.start_epoch, run.settings.epochs):
            metrics = run_epoch(run, epoch)
            if run.main_process:
                with memory_guard(run.settings, 'validation', run.img_size):
                    metrics.update(epoch_end(run.average, run.valid_loader, run.data.classes,
                                             run.mode))
                due = run.monitor is not None and run.monitor.due(epoch, run.settings.epochs)
                with memory_guard(run.settings, 'the pruned-mAP monitor', run.img_size):
                    metrics['pruned_map50'] = run.monitor.measure(run.average) if due else ''
                commit_epoch(run, epoch, metrics)
                print_epoch(epoch, run.settings.epochs, metrics, run.monitor)
            barrier()
    except (KeyboardInterrupt, Stop):
        for s in previous:  # a second signal must not cut this save short
            signal.signal(s, signal.SIG_IGN)
        if run.log is not None:  # a non-finite loss not yet read back: refuse to save
            run.log.read()
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
    with signals_held() as held:
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
    if held:  # acted on once every file of the epoch is written
        raise KeyboardInterrupt() if held[0] == signal.SIGINT else Stop()


def _save(run, name, epoch, extra=None):
    """The average's weights; last.pt also what resuming needs (the live weights)."""
    if run.monitor is not None:
        extra = {**(extra or {}), 'monitor': run.monitor.state_dict()}
    more = (extra,) if extra else ()  # none: the six-argument call tests stand in for
    model = run.ema if name == 'last.pt' and run.ema is not None else run.average
    save_checkpoint(run.path(name), model, run.optimizer, epoch, run.best_fitness,
                    run.settings, *more)


def finish(run, epoch):
    """The gamma histogram and the closing line (rank 0)."""
    if not run.main_process:
        return
    plot = run.path('bn_gammas.png')
    if run.bn_modules:  # the saved weights' gammas
        title = f'{os.path.basename(run.settings.output_dir)}: {run.mode} set, epoch {epoch + 1}'
        plot_gamma_histogram(prunable_bn_modules(run.average, run.mode), plot, title)
    written = [run.path('last.pt'), run.path('best.pt'), 'results.csv'] + (
        [plot] if run.bn_modules else [])
    if run.monitor is not None:
        written += plot_pruned_map(run.settings.output_dir, run.monitor.label,
                                   f'{os.path.basename(run.settings.output_dir)}: {run.mode} mode')
    print('wrote ' + ', '.join(written))


def run_epoch(run, epoch):
    """One pass over the training data; returns the mean losses and the last lr."""
    settings, model, optimizer = run.settings, run.model, run.optimizer
    run.net.train()
    frozen = frozen_parameters(model, settings.freeze, epoch, settings.freeze_epochs)
    if frozen:  # frozen layers keep their BatchNorm statistics too
        for module in model.module_list[:settings.freeze]:
            module.eval()
    run.loader.sampler.set_epoch(epoch)
    if run.penalty is not None:
        run.penalty.start_epoch(epoch)
    run.log, start = LossLog(epoch, run.path('last.pt'), run.completed), time.time()
    bar = tqdm(run.loader, desc=f'epoch {epoch + 1}/{settings.epochs}', leave=False,
               disable=not run.main_process)
    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
    for i, (imgs, targets, _, _) in enumerate(bar):
        step = epoch * run.steps_per_epoch + i // settings.accumulate
        lr = learning_rate(step, epoch, settings.lr, settings.epochs, run.warmup_steps, settings.schedule)
        for group in optimizer.param_groups:
            group['lr'] = lr
        imgs = batch_images(run, imgs, generator)
        with memory_guard(settings, 'training', imgs.shape[-1]):
            items, distill = train_step(run, imgs, targets.to(run.device, non_blocking=True))
            if (i + 1) % settings.accumulate == 0 or i + 1 == len(run.loader):
                optimizer_step(run, lr, frozen)
        if run.log.add(items, distill):
            bar.set_postfix(loss=f'{run.log.sums[4] / run.log.batches:.3f}', lr=f'{lr:.2g}')
    box, obj, cls, distill, total = run.log.means()
    run.log = None
    return {'box': box, 'obj': obj, 'cls': cls, 'distill': distill, 'loss': total, 'lr': lr,
            'seconds': time.time() - start}


def batch_images(run, imgs, generator):
    """The batch on the device, channels-last on CUDA; --multi-scale resizes it to a
    random side in [0.5, 1.5] x img_size, a multiple of the stride."""
    layout = torch.channels_last if run.precision.channels_last else torch.preserve_format
    imgs = imgs.to(run.device, non_blocking=True, memory_format=layout)
    if run.settings.multi_scale:
        stride, img_size = run.model.stride, run.img_size
        low, high = max(1, img_size // 2 // stride), (img_size * 3 // 2) // stride
        size = int(torch.randint(low, high + 1, (1,), generator=generator)) * stride
        imgs = F.interpolate(imgs, size=(size, size), mode='bilinear', align_corners=False)
    return imgs


def train_step(run, imgs, targets):
    """Forward (under autocast with --amp), the loss in float32, backward; returns the
    per-image loss terms and the distillation term, detached, on the device."""
    taught = None
    with run.precision.autocast(run.device):
        heads = run.net(imgs)
        if run.teacher is not None:
            with torch.no_grad():
                taught = run.teacher(imgs, raw=True)
    heads = [h.float() for h in heads]  # the loss in float32, whatever the forward ran in
    loss, items = compute_loss(heads, targets, run.model)
    distill = torch.zeros(1, device=run.device)
    if taught is not None:
        taught = [t.float() for t in taught]
        distill = run.settings.distill_weight * distillation_loss(heads, taught).reshape(1)
        loss = loss + distill * imgs.shape[0]
    # DDP averages gradients over processes; scale back to the sum over all images
    run.precision.scaler.scale(loss * run.world).backward()
    return items, distill.detach()


def optimizer_step(run, lr, frozen):
    """The sparsity gradient joins the (unscaled) gradients, the optimizer steps the
    float32 weights, the proximal step follows, then the average."""
    scaler, optimizer = run.precision.scaler, run.optimizer
    scaler.unscale_(optimizer)  # float16 only: the penalty is added to true gradients
    if run.penalty is not None:
        run.penalty.add_gradient()
    for p in frozen:  # the optimizer skips a parameter without a gradient
        p.grad = None
    scaler.step(optimizer)  # float16: skipped when a gradient overflowed
    scaler.update()
    if run.penalty is not None:  # before zero_grad: frozen gammas have no gradient
        run.penalty.proximal_step(lr)
    optimizer.zero_grad()
    if run.ema is not None:
        run.ema.update()


def epoch_end(model, valid_loader, classes, mode):
    result = evaluate(model, valid_loader, classes, progress=False)
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
