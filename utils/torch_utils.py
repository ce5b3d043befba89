"""Devices, timing, parameter counts and process-group helpers."""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import UserInputError


def select_device(device=''):
    """'' or 'cpu' -> CPU; 'cuda', 'cuda:1' or '1' -> that GPU, refused when absent."""
    text = str(device).strip().lower()
    if text in ('', 'cpu'):
        return torch.device('cpu')
    if text.isdigit():
        text = f'cuda:{text}'
    if not text.startswith('cuda'):
        raise UserInputError(f"--device {device!r}: use 'cpu', 'cuda', 'cuda:N' or a GPU number")
    if not torch.cuda.is_available():
        raise UserInputError(f'--device {device}: CUDA is not available on this machine; '
                             'use --device cpu')
    index = torch.device(text).index or 0
    if index >= torch.cuda.device_count():
        raise UserInputError(f'--device {device}: only {torch.cuda.device_count()} GPU(s) here')
    return torch.device(text)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_sync(device):
    """A wall-clock reading after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def median_seconds(function, repeat=3):
    """Median wall time of `repeat` calls of `function()`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- several processes

def distributed_setup(device):
    """Join the torchrun process group when launched by torchrun: (rank, world size)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    dist.init_process_group(backend=backend)
    return dist.get_rank(), world


def distributed_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unwrap(model):
    """The Darknet model inside a DistributedDataParallel wrapper, or the model itself."""
    return model.module if hasattr(model, 'module') else model


# ---------------------------------------------------------------- model cost

def count_macs(model, img_size):
    """Multiply-accumulates of the convolutions (everything else is a rounding error in
    these models) for one img_size x img_size image, from the layer shapes alone."""
    total = 0
    for i, layer in enumerate(model.module_defs):
        if layer['type'] == 'convolutional':
            conv = model.module_list[i].Conv2d
            cells = (img_size // model.layer_strides[i]) ** 2
            total += int(cells) * conv.weight.numel()  # out * (in / groups) * kh * kw
    return total


def measure_latency(model, img_size, device=None, min_runs=3, max_runs=50, budget=0.0,
                    warmup=0):
    """Median seconds of a batch-1 forward pass (synchronised on CUDA), after `warmup`
    passes: at least `min_runs`, then more until `budget` seconds or `max_runs`. The
    median of three already ignores a slow first pass."""
    device = device or next(model.parameters()).device
    x = torch.rand(1, model.hyperparams.get('channels', 3), img_size, img_size, device=device)
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        while len(times) < min_runs or (sum(times) < budget and len(times) < max_runs):
            start = time_sync(device)
            model(x)
            times.append(time_sync(device) - start)
    return sorted(times)[len(times) // 2]


def fused_latency(model, img_size, **kwargs):
    """measure_latency (same keywords) of the inference-ready copy, BN folded into the
    convs (`Darknet.fuse`): the PyTorch figure a deployed model gets. `model` is left as
    it was."""
    return measure_latency(model.fuse(), img_size, **kwargs)


def interleaved_medians(runs, rounds=7, warmup=1):
    """Median seconds of each zero-argument callable in `runs`, timed one call of each
    per round, so a slower moment of the machine hits every one alike and their ratios
    hold: how an original and its pruned copies are compared."""
    for run in runs:
        for _ in range(warmup):
            run()
    times = [[] for _ in runs]
    for _ in range(rounds):
        for run, seconds in zip(runs, times):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


# ---------------------------------------------------------------- latency of two models

@dataclass
class RatioTiming:
    """Two runs timed in interleaved rounds. `ratio` is the median over the rounds of
    second / first (each round's pair shares the machine's moment), `spread` half the
    interquartile range of those per-round ratios; `stable` says the spread is within
    the tolerance the timing was asked for."""
    first: float    # median seconds of one call of the first run
    second: float   # the same for the second run
    ratio: float
    spread: float
    rounds: int
    stable: bool


def ratio_spread(first_times, second_times):
    """(median, half the interquartile range) of the per-round ratios second / first."""
    ratios = np.asarray(second_times, float) / np.asarray(first_times, float)
    low, median, high = np.percentile(ratios, [25, 50, 75])
    return float(median), float(high - low) / 2


def interleaved_ratio(first, second, min_rounds=5, max_rounds=40, budget=5.0, tolerance=0.1,
                      warmup=1, clock=time.perf_counter):
    """Time the zero-argument callables `first` and `second` in rounds (first, second,
    first, second, ...) until, after `min_rounds`, the spread of the per-round ratio is
    at most `tolerance` of the ratio, or `budget` seconds or `max_rounds` rounds are
    spent. One call of each per round: a slower moment of the machine hits both alike,
    and its effect on the ratio shows as spread instead of hiding in one of the two
    figures. `clock` is the time source (a test passes a fake one)."""
    for _ in range(warmup):
        first()
        second()
    times, start = ([], []), clock()
    while True:
        for run, seconds in zip((first, second), times):
            before = clock()
            run()
            seconds.append(clock() - before)
        rounds = len(times[0])
        ratio, spread = ratio_spread(*times)
        stable = spread <= tolerance * ratio
        if rounds >= min_rounds and (stable or clock() - start >= budget or rounds >= max_rounds):
            return RatioTiming(float(np.median(times[0])), float(np.median(times[1])), ratio,
                               spread, rounds, bool(stable))


def forward_runner(model, img_size):
    """A zero-argument callable: one batch-1 forward of the inference-ready copy of
    `model` (BN folded into the convs, `Darknet.fuse`), synchronised on CUDA; `model` is
    left as it was."""
    fused = model.fuse().eval()
    device = next(fused.parameters()).device
    x = torch.rand(1, model.hyperparams.get('channels', 3), img_size, img_size, device=device)

    def run():
        with torch.no_grad():
            fused(x)
        synchronize(device)
    return run
