"""Where a training step's time goes, for any cfg and size: issue 26's table.

    python benchmarks/train_speed.py --cfg cfg/yolov3-tiny-shapes.cfg --img-size 256 \
        --batch-size 8 --iterations 5

Parts, each timed alone (median of --iterations after 2 warm-up runs, the device
synchronised around each):
- loader: the augmenting training loader over the demo set, images/s;
- step: forward, loss, backward and SGD on one random batch, images/s, in float32, with
  autocast (--amp's type for the device), and with autocast and channels-last; each also
  with a trivial loss (the sum of squares of the heads), which shows what the loss costs;
- loss: `compute_loss` on random heads with about 6 targets an image, ms per batch, the
  earlier implementation (tests/loss_reference.py) against the current one, forward
  alone and forward + backward;
- end to end: train.py for 2 epochs on a slice of the demo set, with validation; images/s
  of the second epoch's training loop, and of the whole run.
On the CPU always, and on CUDA when present (--device). Each run writes its table into
benchmarks/train_speed.md under a heading naming the machine, cfg, size and batch,
replacing an earlier table with that heading and keeping the others.
"""
import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from loss_reference import compute_loss as reference_loss  # noqa: E402

import train  # noqa: E402
from cli import demo  # noqa: E402
from darknet.cfg import parse_data_cfg  # noqa: E402
from darknet.loss import compute_loss  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from data.datasets import create_dataloader  # noqa: E402
from training.engine import choose_precision, make_optimizer  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402
from utils.torch_utils import synchronize  # noqa: E402

OUTPUT = os.path.join(ROOT, 'benchmarks', 'train_speed.md')
TARGETS_PER_IMAGE = 6


def timed(fn, device, iterations, warmup=2):
    """Median seconds of `fn()` over `iterations` runs after `warmup` runs."""
    times = []
    for i in range(warmup + iterations):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_targets(batch, classes, generator):
    """About TARGETS_PER_IMAGE boxes an image: (n, 6) image, class, cx, cy, w, h."""
    n = batch * TARGETS_PER_IMAGE
    return torch.cat((torch.randint(0, batch, (n, 1), generator=generator).float(),
                      torch.randint(0, max(classes, 1), (n, 1), generator=generator).float(),
                      0.1 + 0.8 * torch.rand(n, 2, generator=generator),
                      0.02 + 0.4 * torch.rand(n, 2, generator=generator)), 1)


# ---------------------------------------------------------------- the parts

def loader_speed(args, model, data):
    """Images/s of the augmenting training loader alone."""
    if data is None:
        return {}
    options = parse_data_cfg(data)
    loader, _ = create_dataloader(options['train'], args.img_size, args.batch_size,
                                  options['classes'], augment=True, workers=args.workers,
                                  shuffle=True, stride=model.stride,
                                  pin_memory=args.device.type == 'cuda')
    batches = iter(loader)
    next(batches)  # workers started
    count = args.iterations * 4
    start = time.perf_counter()
    seen = sum(len(next(batches)[0]) for _ in range(min(count, len(loader) - 1)))
    return {f'loader alone (augmenting, {loader.num_workers} workers)':
            f'{seen / (time.perf_counter() - start):.0f} img/s'}


def step_speed(args, model, amp, channels_last, trivial):
    """Images/s of forward, loss, backward and SGD on one random batch."""
    device = args.device
    precision = choose_precision(amp, device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout).train()
    generator = torch.Generator().manual_seed(0)
    imgs = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    imgs = imgs.to(device, memory_format=layout)
    targets = random_targets(args.batch_size, model.num_classes, generator).to(device)
    optimizer = make_optimizer(model, 1e-4, 0.9, 5e-4)

    def step():
        with precision.autocast(device):
            heads = model(imgs)
        heads = [h.float() for h in heads]
        loss = (sum((h ** 2).sum() for h in heads) if trivial
                else compute_loss(heads, targets, model)[0])
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad()
    return args.batch_size / timed(step, device, args.iterations)


def step_speeds(args, model):
    rows = {}
    amp_name = str(choose_precision(True, args.device).dtype).replace('torch.', '')
    for label, amp, channels_last in ((
            'float32', False, False), (f'{amp_name} autocast', True, False),
            (f'{amp_name} autocast + channels_last', True, True)):
        for trivial in (False, True):
            name = f'step alone, {label}, {"trivial loss" if trivial else "compute_loss"}'
            rows[name] = f'{step_speed(args, model, amp, channels_last, trivial):.1f} img/s'
    model.to(memory_format=torch.contiguous_format)
    return rows


def loss_speed(args, model):
    """ms per batch of the reference loss and the current one, forward and with backward."""
    device = args.device
    model = model.to(device).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the yolo layers learn their strides
        shapes = [h.shape[1:] for h in model(torch.zeros(1, 3, args.img_size, args.img_size,
                                                          device=device))]
    heads = [(2 * torch.randn(args.batch_size, *s, generator=generator)).to(device)
             .requires_grad_() for s in shapes]
    targets = random_targets(args.batch_size, model.num_classes, generator).to(device)
    rows = {}

    def backward(fn):
        for h in heads:  # as in training, where the heads' gradient flows on, not adds up
            h.grad = None
        fn(heads, targets, model)[0].backward()
    for name, fn in (('reference (before issue 26)', reference_loss), ('current', compute_loss)):
        forward = timed(lambda: fn(heads, targets, model), device, args.iterations)
        both = timed(lambda: backward(fn), device, args.iterations)
        rows[f'loss alone, {name}, forward'] = f'{forward * 1000:.2f} ms'
        rows[f'loss alone, {name}, forward + backward'] = f'{both * 1000:.2f} ms'
    # any backward hands the heads a dense gradient: its allocation is a floor
    floor = timed(lambda: [torch.zeros(h.shape, device=device) for h in heads], device,
                  args.iterations)
    rows['of which: a zero gradient the size of the heads'] = f'{floor * 1000:.2f} ms'
    return rows


def end_to_end(args, data):
    """train.py for 2 epochs on the first --e2e-images training images (and a fifth as
    many validation images): the second epoch's training loop and the whole run."""
    if data is None:
        return {}
    options = parse_data_cfg(data)
    with tempfile.TemporaryDirectory() as folder:
        lists = {}
        for key, count in (('train', args.e2e_images), ('valid', max(1, args.e2e_images // 5))):
            lines = open(options[key], encoding='utf-8').read().split('\n')[:count]
            lists[key] = os.path.join(folder, f'{key}.txt')
            with open(lists[key], 'w', encoding='utf-8') as f:
                f.write('\n'.join(os.path.join(os.path.dirname(options[key]), line)
                                  if line and not os.path.isabs(line) else line
                                  for line in lines) + '\n')
        data_file = os.path.join(folder, 'slice.data')
        with open(data_file, 'w', encoding='utf-8') as f:
            f.write(f'classes={options["classes"]}\ntrain={lists["train"]}\n'
                    f'valid={lists["valid"]}\n')
        start = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, 'w')):
            metrics = train.main(['--cfg', args.cfg, '--data', data_file, '--img-size',
                                  str(args.img_size), '--batch-size', str(args.batch_size),
                                  '--epochs', '2', '--output-dir', os.path.join(folder, 'run'),
                                  '--device', str(args.device), '--workers', str(args.workers)])
        whole = time.perf_counter() - start
    return {'end to end, train.py, second epoch\'s training loop':
            f'{args.e2e_images / metrics["seconds"]:.1f} img/s',
            'end to end, train.py, whole run (2 epochs, validation, checkpoints)':
            f'{2 * args.e2e_images / whole:.1f} img/s'}


# ---------------------------------------------------------------- the report

def machine(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.isfile('/proc/cpuinfo'):
        names = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo', encoding='utf-8')
                 if line.startswith('model name')]
        name = names[0] if names else name
    return f'{name} CPU, {os.cpu_count()} cores, no GPU used'


def write_section(heading, rows, path=OUTPUT):
    """Replace the section under `heading` in `path` (or add it), keep the others."""
    old = open(path, encoding='utf-8').read() if os.path.isfile(path) else (
        '# Training speed\n\nWritten by benchmarks/train_speed.py; see its docstring for '
        'what each part times.\n')
    sections = old.split('\n## ')
    kept = [s for s in sections[1:] if s.split('\n', 1)[0] != heading]
    table = '\n'.join([f'{heading}', '', '| part | speed |', '|---|---|'] +
                      [f'| {name} | {value} |' for name, value in rows.items()])
    atomic_write_text(path, '\n## '.join([sections[0].rstrip('\n') + '\n'] + kept + [table])
                      + '\n')


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', default=demo.YOLOV3['cfg'], help='model definition (.cfg)')
    parser.add_argument('--img-size', type=int, default=416)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--iterations', type=int, default=5, help='timed runs of each part')
    parser.add_argument('--parts', nargs='+', default=['loader', 'step', 'loss', 'e2e'],
                        choices=['loader', 'step', 'loss', 'e2e'])
    parser.add_argument('--device', default='', help="'' (CUDA when present), cpu, cuda")
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument('--e2e-images', type=int, default=1000,
                        help='training images of the end-to-end run')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model = Darknet(args.cfg)
    data = demo.ensure_demo_data()
    if parse_data_cfg(data)['classes'] != model.num_classes:
        data = None  # the loader and end-to-end parts need the demo set's classes
    rows = {}
    for part, fn in (('loader', lambda: loader_speed(args, model, data)),
                     ('step', lambda: step_speeds(args, model)),
                     ('loss', lambda: loss_speed(args, model)),
                     ('e2e', lambda: end_to_end(args, data))):
        if part in args.parts:
            for name, value in fn().items():
                print(f'{name}: {value}', flush=True)
                rows[name] = value
    heading = (f'{datetime.date.today()}, {machine(args.device)}, torch {torch.__version__}: '
               f'{os.path.relpath(args.cfg, ROOT)} at {args.img_size}, batch {args.batch_size}')
    write_section(heading, rows)
    print(f'wrote {OUTPUT}')


if __name__ == '__main__':
    main()
