"""Prune the full YOLOv3 (random weights, sparse-like gammas) and time it.

    python benchmarks/prune_yolov3.py [--mode shortcut] [--percent 0.6] [--img-size 416]

Side by side in one run, so the ratios hold on a noisy machine:
- the prune script's whole run (in-process: load, plan, fold, compact, self-check,
  write, measure) against a bare load + save of the same model (target: under 3x);
- the compact model's CPU speed-up against its MAC reduction, batch 1 (target: the
  speed-up is at least 0.8 of the MAC ratio).
No data: no mAP. 70% of every layer's gammas are made ~0, the same channel indices in
every layer, so shortcut groups have whole channels to lose.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli.prune import main as prune_main  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_weights, save_weights  # noqa: E402
from utils.torch_utils import count_macs, measure_latency, median_seconds  # noqa: E402


def sparse_like(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                small = (torch.arange(n) * 7919) % 10 < 7
                module.weight.copy_((0.5 + torch.rand(n, generator=generator))
                                    * torch.where(small, 1e-3, 1.0))
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', default='cfg/yolov3.cfg')
    parser.add_argument('--mode', default='shortcut',
                        choices=('normal', 'regular', 'shortcut', 'tiny'))
    parser.add_argument('--percent', type=float, default=0.6)
    parser.add_argument('--img-size', type=int, default=416)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, 'sparse.weights')
        save_weights(sparse_like(Darknet(args.cfg)), weights)
        copy = os.path.join(folder, 'copy.weights')
        bare = median_seconds(lambda: save_weights(load_weights(Darknet(args.cfg), weights), copy),
                           args.repeat)
        flags = ['--cfg', args.cfg, '--weights', weights, '--percent', str(args.percent),
                 '--img-size', str(args.img_size), '--output-dir', os.path.join(folder, 'out'),
                 '--exist-ok']  # the repeats write the same names
        results = []
        pruning = median_seconds(lambda: results.append(prune_main(args.mode, flags)), args.repeat)
        result = results[-1]
        original = load_weights(Darknet(args.cfg), weights)
        compact = load_weights(Darknet(result['cfg']), result['weights'])
        latency = [measure_latency(m, args.img_size, min_runs=10, budget=5.0, warmup=1)
                   for m in (original, compact)]
        macs = [count_macs(m, args.img_size) for m in (original, compact)]
    speedup, mac_ratio = latency[0] / latency[1], macs[0] / macs[1]
    print(f'\n{args.cfg}, {args.mode} mode at --percent {args.percent}, {args.img_size}x'
          f'{args.img_size}, median of {args.repeat} (CPU threads: {torch.get_num_threads()}):')
    print(f'  bare load + save          {bare:6.2f} s')
    print(f'  prune script (in-process) {pruning:6.2f} s  = {pruning / bare:.2f}x (target < 3x)')
    print(f'  GMACs {macs[0] / 1e9:.2f} -> {macs[1] / 1e9:.2f} ({mac_ratio:.2f}x fewer); latency '
          f'{latency[0] * 1e3:.0f} -> {latency[1] * 1e3:.0f} ms ({speedup:.2f}x faster): '
          f'{speedup / mac_ratio:.2f} of the MAC ratio (target >= 0.8)')


if __name__ == '__main__':
    main()
