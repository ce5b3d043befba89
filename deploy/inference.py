"""The model as it should run where it is deployed: BN fused, fp16, channels_last, and on
a GPU replayed from a CUDA graph.

    from deploy.inference import prepare
    run = prepare(model, torch.device('cuda'), half=True, channels_last=True, graph=True)
    detections = run(images)   # (B, N, 5+C) float32, as model(images) in eval mode
    print(run.describe())      # the mode, and what each capture took

CUDA graphs, not torch.compile. At batch 1 the eager model is bound by kernel launches
(docs/speed.md: 5.2 ms eager against 1.1-1.9 ms replayed on an H200, and pruning then
pays). A CUDA graph removes the launches and nothing else: the kernels are cuDNN's,
exactly those of the eager model, so the output is the eager one to the bit; capture is
one warm-up and one recorded pass per input shape (well under a second), and it works
on every torch the project admits (2.4 on) with no compiler. torch.compile's
`reduce-overhead` mode replays CUDA graphs too, but first compiles for tens of seconds
per model and shape (20 s on the CPU for a ten-layer test model), recompiles on each
new shape, and on these conv-bound models its generated kernels have little to add to
cuDNN's convolutions. The forward is capture-safe for both (darknet/layers.py
YOLOLayer, tests/test_capture_safe.py).

A graph holds fixed input and output memory, so there is one per input shape (test.py's
rectangular batches bring a few), at most `max_graphs`; shapes beyond those run eagerly.
On the CPU there is nothing to capture and `graph=True` runs eagerly (`run.mode` says
which). `half` works on the CPU too (slowly; the tests use it); the scripts refuse
`--half` without `--device cuda`.
"""
import copy
import time

import torch
from torch import nn

from utils.errors import UserInputError

MAX_GRAPHS = 4
WARMUP = 2  # passes before a capture: cuDNN picks its algorithms, the decode builds its buffers


def check_half(half, device, exported=False):
    """The scripts' --half: fp16 on a GPU only (on the CPU fp16 convolutions are slower
    than fp32, and an exported file has its precision fixed at export)."""
    if half and exported:
        raise UserInputError('--half runs a PyTorch model in fp16; for an fp16 .onnx file '
                             'export one with export.py --half')
    if half and torch.device(device).type != 'cuda':
        raise UserInputError('--half needs --device cuda: on the CPU fp16 runs slower than '
                             'fp32; drop --half or pass --device cuda')


class Prepared(nn.Module):
    """A model made inference-ready by `prepare`: called on (B, C, H, W) images of any
    float dtype it returns the model's eval output, float32, on the model's device. An
    nn.Module, so evaluation.evaluate takes it in place of the model (it does not fuse
    it again: it is not a Darknet)."""

    def __init__(self, net, device, dtype, memory_format, graph, max_graphs=MAX_GRAPHS):
        super().__init__()
        self.net = net
        self.device, self.dtype, self.memory_format = device, dtype, memory_format
        self.graph = graph and device.type == 'cuda'
        self.max_graphs = max_graphs
        self.graphs = {}    # input shape -> (CUDAGraph, static input, static output)
        self.captures = []  # (input shape, seconds) of each capture
        self.eval()

    @property
    def mode(self):
        return 'cuda-graph' if self.graph else 'eager'

    def _input(self, x):
        return x.to(self.device, self.dtype, non_blocking=True).contiguous(
            memory_format=self.memory_format)

    def forward(self, x):
        shape = tuple(x.shape)
        if self.graph and (shape in self.graphs or len(self.graphs) < self.max_graphs):
            if shape not in self.graphs:
                self.graphs[shape] = self._capture(x)
            graph, static_in, static_out = self.graphs[shape]
            static_in.copy_(x)  # casts and lays out as the static input is
            graph.replay()
            # the next replay overwrites the static output: hand out a copy
            return static_out.to(torch.float32, copy=True)
        with torch.no_grad():
            return self.net(self._input(x)).float()

    def _capture(self, x):
        """Warm up on a side stream (the capture's rule), then record one pass."""
        start = time.perf_counter()
        static_in = self._input(x).clone(memory_format=self.memory_format)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(WARMUP):
                self.net(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.net(static_in)
        torch.cuda.synchronize(self.device)
        self.captures.append((tuple(x.shape), time.perf_counter() - start))
        return graph, static_in, static_out

    def describe(self):
        """One line: how it runs, and the capture times so far."""
        precision = 'fp16' if self.dtype == torch.float16 else 'fp32'
        layout = ', channels_last' if self.memory_format == torch.channels_last else ''
        line = f'inference: {self.mode}, {precision}{layout} on {self.device}'
        if self.captures:
            line += '; captured ' + ', '.join(f'{"x".join(map(str, s))} in {t:.2f} s'
                                             for s, t in self.captures)
        return line


def prepare(model, device, half=False, channels_last=False, graph=False,
            max_graphs=MAX_GRAPHS):
    """`model` made ready to run on `device` (a torch.device or its name): its fused copy
    (`model.fuse()` where it has one; BN folded into the convs) in eval mode, fp16 with
    `half`, its convs' weights and inputs in channels_last with `channels_last`, and with
    `graph` replayed from a CUDA graph per input shape (on CUDA; the CPU runs eagerly).
    `model` itself is left as it was. Returns a `Prepared` module."""
    device = torch.device(device)
    net = model.fuse() if hasattr(model, 'fuse') else copy.deepcopy(model)
    net = net.eval().to(device)
    dtype = torch.float16 if half else torch.float32
    net = net.to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return Prepared(net, device, dtype, memory_format, graph, max_graphs)
