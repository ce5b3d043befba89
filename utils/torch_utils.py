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

def count_macs(model, img_size, device=None):
    """Multiply-accumulates of one forward pass at img_size x img_size (convolutions only:
    everything else is a rounding error in these models)."""
    device = device or next(model.parameters()).device
    total = []

    def hook(module, inputs, output):
        kernel = module.weight[0].numel()  # (in / groups) * kh * kw
        total.append(output.numel() // output.shape[0] * kernel)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.hyperparams.get('channels', 3), img_size,
                                     img_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sum(total)


def measure_latency(model, img_size, device=None, runs=20, warmup=3):
    """Median seconds of a batch-1 forward pass (synchronised on CUDA)."""
    device = device or next(model.parameters()).device
    x = torch.rand(1, model.hyperparams.get('channels', 3), img_size, img_size, device=device)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            start = time_sync(device)
            model(x)
            if i >= warmup:
                times.append(time_sync(device) - start)
    return sorted(times)[len(times) // 2]
