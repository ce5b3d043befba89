"""Devices, timing, parameter counts and process-group helpers."""
import os
import time

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
