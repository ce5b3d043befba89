"""Batch-1 CPU latency against the MAC cut: PyTorch (fused), ONNX Runtime FP32 and INT8.

    python benchmarks/speed.py [--threads 2] [--rounds 7] [--output benchmarks/speed]

Models, each pruned at two to four cuts and timed beside its original:
- full-size YOLOv3 and YOLOv3-tiny at 416 with random weights whose BN statistics are
  set by one train-mode pass (so activations keep a sane scale, no denormals), then the
  gammas of 70% of every prunable channel (shortcut mode for YOLOv3, tiny mode for
  tiny; the same indices in every conv of a shortcut group) set to 0: `--percent 0.5`
  then cuts all of them, as sparsity training would;
- the sparsity-trained demo models at 128, with mAP@0.5 on the demo validation set of
  the FP32 and INT8 ONNX files (INT8 calibrated on 64 demo training images; the
  full-size models on 4 random images, which is enough for timing).
Runtimes: PyTorch eager on the fused model (`Darknet.fuse`), onnxruntime FP32 on the
export, onnxruntime INT8 on `quantize_int8` of it (QDQ, per-channel). All models and
runtimes of one family are timed runtime by runtime, the models of each round by round
(one pass of each per round), medians of --rounds, --threads threads everywhere; the
onnxruntime sessions do not spin between runs, so one session's idle threads do not
slow the next. Efficiency = (latency ratio) / (MAC ratio):
1.0 would be a speed-up as large as the MAC cut.

The `--round-to` sweep prunes each mode at --percent 0.5 with kept widths rounded up to
multiples of none, 4, 8, 16 and 32 (regular mode without it: powers of two) and times
all three runtimes, against the parameters kept. Then onnxruntime's
profiler splits the run of the original and the 10x-cut YOLOv3, and of a pruned demo
model in FP32 and INT8, by op type.

Writes --output.md (tables), --output.png (plot) and --output.json.
"""
import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
from cli import demo  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_weights  # noqa: E402
from data.datasets import LoadImagesAndLabels, create_dataloader  # noqa: E402
from deploy.inference import prepare  # noqa: E402
from deploy.onnx_export import OnnxModel, export_onnx, ort_session, quantize_int8  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from pruning.graph import prunable_units  # noqa: E402
from pruning.latency import (TorchTimer, latency_costs, latency_table, make_timer,  # noqa: E402
                             predicted_latency)
from pruning.plan import Ranking, compact_cost, plan_masks, rank_channels  # noqa: E402
from pruning.surgery import prune  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402
from utils.plots import pyplot, save_figure  # noqa: E402
from utils.torch_utils import count_macs, count_parameters, interleaved_medians  # noqa: E402

ZERO_SHARE = 0.7
# (label, cfg, size, weights or the mode whose channels get zero gammas, cuts); a cut is
# (mode, percent, layer_keep, round_to)
FAMILIES = [
    ('YOLOv3', 'cfg/yolov3.cfg', 416, 'shortcut',
     [('shortcut', 0.5, None, None), ('shortcut', 0.5, None, 8), ('shortcut', 0.5, None, 16),
      ('shortcut', 0.5, 0.5, None), ('regular', 0.5, None, 8), ('normal', 0.5, None, None),
      ('normal', 0.5, None, 8)]),
    ('YOLOv3-tiny', 'cfg/yolov3-tiny.cfg', 416, 'tiny',
     [('tiny', 0.5, None, None), ('tiny', 0.5, None, 16), ('tiny', 0.5, 0.5, None)]),
    ('demo YOLOv3', demo.YOLOV3['cfg'], demo.IMG_SIZE, demo.YOLOV3['sparse_weights'],
     [('shortcut', 0.5, demo.LAYER_KEEP, None), ('normal', 0.5, demo.LAYER_KEEP, None)]),
    ('demo YOLOv3-tiny', demo.TINY['cfg'], demo.IMG_SIZE, demo.TINY['sparse_weights'],
     [('tiny', 0.5, demo.LAYER_KEEP, None)]),
]
SWEEP = [('YOLOv3', 'normal'), ('YOLOv3', 'regular'), ('YOLOv3', 'shortcut'),
         ('YOLOv3-tiny', 'tiny')]
ROUND_TO = (None, 4, 8, 16, 32)


def zeroed_model(cfg, mode, img_size, share=ZERO_SHARE):
    """Random weights, BN statistics from one train-mode pass of a random image, then
    `share` of every prunable unit's gammas set to 0."""
    model = Darknet(cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # the running statistics become this one batch's
    with torch.no_grad():
        model.train()(torch.rand(2, 3, img_size, img_size, generator=torch.Generator()
                                 .manual_seed(0)))
    _, units, _ = prunable_units(model, mode)
    with torch.no_grad():
        for unit in units:
            for i in unit:
                bn = model.module_list[i].BatchNorm2d
                zero = (torch.arange(bn.num_features) * 7919) % 10 < round(10 * share)
                bn.weight[zero] = 0.0
    for bn in bns:
        bn.momentum = 0.03
    return model.eval()


def cut_name(cut):
    mode, percent, keep, round_to = cut
    return (f'{mode} {percent:g}' + (f', layer-keep {keep:g}' if keep else '')
            + (f', round-to {round_to}' if round_to else ''))


def build(family):
    label, cfg, size, source, cuts = family
    if source.endswith(('.pt', '.weights')):
        model = load_weights(Darknet(cfg), demo.require_demo_weights(source)).eval()
    else:
        model = zeroed_model(cfg, source, size)
    models = [('original', model)]
    for cut in cuts:
        mode, percent, keep, round_to = cut
        models.append((cut_name(cut), prune(model, plan_masks(model, mode, percent, keep,
                                                               round_to))[1].eval()))
    return models


def calibration_images(size, demo_data):
    if demo_data:
        dataset = LoadImagesAndLabels('data/shapes/train.txt', size)
        picks = np.linspace(0, len(dataset) - 1, 64).round().astype(int)
        return [dataset[int(k)][0][None].numpy() for k in picks]
    rng = np.random.default_rng(0)
    return [rng.random((1, 3, size, size), np.float32) for _ in range(4)]


EXPORTED = {}  # id(model) -> its files: an original serves several families' rows


def time_family(models, size, folder, threads, rounds, int8_images=None, tag='m'):
    """{name: {'torch': s, 'fp32': s, 'int8': s, 'macs': n, 'params': n, 'paths'}}: the
    models interleaved round by round within each runtime."""
    x = torch.rand(1, 3, size, size)
    feed = {'images': x.numpy()}
    rows, runs = {}, collections.defaultdict(list)
    for k, (name, model) in enumerate(models):
        fused = model.fuse()
        paths = EXPORTED.get(id(model))
        if paths is None:
            fp32 = os.path.join(folder, f'{tag}{k}.onnx')
            export_onnx(model, fp32, size)
            paths = {'fp32': fp32}
            if int8_images is not None:
                paths['int8'] = quantize_int8(fp32, os.path.join(folder, f'{tag}{k}-int8.onnx'),
                                              int8_images)
            EXPORTED[id(model)] = paths
        rows[name] = {'macs': count_macs(model, size), 'params': count_parameters(model),
                      'paths': paths}

        def forward(net=fused):
            with torch.no_grad():
                net(x)
        runs['torch'].append((name, forward))
        for runtime, path in paths.items():
            # no spinning: a session's idle threads would busy-wait through the next one's run
            session = ort_session(path, threads, spinning=False)
            runs[runtime].append((name, lambda s=session: s.run(None, feed)))
    for runtime, named in runs.items():  # one runtime at a time: no cross-runtime contention
        for (name, _), seconds in zip(named, interleaved_medians([r for _, r in named], rounds)):
            rows[name][runtime] = seconds
    return rows


def demo_maps(rows, size):
    """mAP@0.5 of each model's FP32 and INT8 files on the demo validation set."""
    loader, _ = create_dataloader('data/shapes/valid.txt', size, 16, 4)
    for row in rows.values():
        for runtime, path in row['paths'].items():
            row[f'map_{runtime}'] = evaluate(OnnxModel(path, 2), loader, 4,
                                             progress=False).metrics['map50']


def ort_profile(path, size, threads, model, runs=10):
    """Milliseconds per run by op type, the five slowest nodes, and by layer: (ms in the
    nodes of conv layers, their GMACs, ms in all other nodes), from onnxruntime's
    profiler."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, 'profile')
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        feed = {'images': np.random.default_rng(0).random((1, 3, size, size), np.float32)}
        for _ in range(runs + 1):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    by_op, by_node = collections.Counter(), collections.Counter()
    convs = {i for i, layer in enumerate(model.module_defs) if layer['type'] == 'convolutional'}
    conv_ms = other_ms = 0.0
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
            ms = event['dur'] / 1e3 / (runs + 1)
            by_op[event['args']['op_name']] += ms
            by_node[event['name'][:-len('_kernel_time')]] += ms
            layer = re.search(r'module_list\.(\d+)/', event['name'])
            if layer and int(layer.group(1)) in convs:
                conv_ms += ms
            else:
                other_ms += ms
    return by_op, by_node.most_common(5), (conv_ms, count_macs(model, size) / 1e9, other_ms)


# ---------------------------------------------------------------- latency as the cost

LATENCY_TARGET = 0.4   # of the original's measured latency (YOLOv3 at 416, onnxruntime)
DEMO_LATENCY_TARGET = 0.75  # the demo models at 128 cannot reach 0.4x: fixed costs dominate
CRITERION = 'consumer'  # benchmarks/criteria.py's choice, whose default cost is params


def _latency_ranking(model, mode, table, base, masks=None, floor=0.0):
    """`base` (a Ranking) with each key (plus `floor`, which orders exact zeros by what
    they save) divided by its unit's ms saved per channel."""
    costs = latency_costs(table, model, base.units, masks)
    keys = [(k + floor) / c for k, c in zip(base.keys, costs)]
    return Ranking(base.criterion, 'latency', base.info, base.units, keys, torch.cat(keys))


def plan_at_share(model, mode, ranking, table, share, layer_keep, round_to=8, steps=14):
    """The smallest percent (bisection) whose plan's predicted latency is at most `share`
    of the table's measured original: (plan, predicted share)."""
    def attempt(percent):
        plan = plan_masks(model, mode, percent, layer_keep, round_to, ranking=ranking)
        return plan, predicted_latency(table, model, plan.masks) / table.latency
    low, high = 0.0, 0.99
    best = attempt(high)
    for _ in range(steps):
        middle = (low + high) / 2
        found = attempt(middle)
        if found[1] <= share:
            high, best = middle, found
        else:
            low = middle
    return best


def latency_cost_case(model, mode, size, target, layer_keep, rounds, threads, folder, tag):
    """Plans at `target` of the measured latency: ranked by CRITERION's score per ms
    saved (the table's costs, refined once at the plan found), and by its score per
    parameter (its default cost) at the same predicted latency; both measured again with
    onnxruntime beside the original."""
    table = latency_table(model, mode, size, make_timer())
    base = rank_channels(model, mode, CRITERION)
    ranking = _latency_ranking(model, mode, table, base)
    plan, _ = plan_at_share(model, mode, ranking, table, target, layer_keep)
    ranking = _latency_ranking(model, mode, table, base, plan.masks)
    plan, predicted = plan_at_share(model, mode, ranking, table, target, layer_keep)
    params_ranking = rank_channels(model, mode, CRITERION, cost='params')
    params_plan, params_predicted = plan_at_share(model, mode, params_ranking, table,
                                                  predicted, layer_keep)
    models = [('original', model), ('latency cost', prune(model, plan)[1].eval()),
              ('params cost', prune(model, params_plan)[1].eval())]
    rows = time_family(models, size, folder, threads, rounds, tag=tag)
    rows['latency cost']['predicted'] = predicted
    rows['params cost']['predicted'] = params_predicted
    rows['original'].update(table_seconds=table.seconds_to_measure, predicted=1.0)
    return rows


def latency_cost_table(cases):
    lines = ['| model | plan | predicted share | measured ms | measured share | params kept '
             '| MAC cut | mAP@0.5 |', '|---|---|---|---|---|---|---|---|']
    for label, target, rows in cases:
        base = rows['original']
        for name, row in rows.items():
            maps = f'{row["map50"]:.3f}' if 'map50' in row else ''
            lines.append(f'| {label} (target {target:g}) | {name} | {row["predicted"]:.3f} | '
                         f'{row["fp32"] * 1e3:.1f} | {row["fp32"] / base["fp32"]:.3f} | '
                         f'{row["params"] / base["params"]:.1%} | '
                         f'{base["macs"] / row["macs"]:.2f}x | {maps} |')
    return '\n'.join(lines)


def latency_cost_section(folder, rounds, threads):
    """YOLOv3 at 416 (random weights, random gammas) and the sparse demo YOLOv3 at 128
    (mAP@0.5 on the demo validation set, no recalibration, for both plans alike)."""
    model = zeroed_model('cfg/yolov3.cfg', 'shortcut', 416, share=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(0.2 + 0.8 * torch.rand(m.num_features, generator=generator))
    cases = [('YOLOv3 416', LATENCY_TARGET,
              latency_cost_case(model, 'shortcut', 416, LATENCY_TARGET, 0.05, rounds, threads,
                                folder, 'lc0-'))]
    demo_model = load_weights(Darknet(demo.YOLOV3['cfg']),
                              demo.require_demo_weights(demo.YOLOV3['sparse_weights'])).eval()
    rows = latency_cost_case(demo_model, 'shortcut', demo.IMG_SIZE, DEMO_LATENCY_TARGET,
                             demo.LAYER_KEEP, rounds * 5, threads, folder, 'lc1-')
    loader, _ = create_dataloader('data/shapes/valid.txt', demo.IMG_SIZE, 16, 4)
    for name, row in rows.items():
        row['map50'] = evaluate(OnnxModel(row['paths']['fp32'], 2), loader, 4,
                                progress=False).metrics['map50']
    cases.append(('demo YOLOv3 128', DEMO_LATENCY_TARGET, rows))
    return cases


# ---------------------------------------------------------------- CUDA

CUDA_SETTINGS = [  # (label, graph, half, channels_last, batch)
    ('eager fp32, batch 1', False, False, False, 1),
    ('eager fp16, batch 1', False, True, False, 1),
    ('eager fp32, batch 64', False, False, False, 64),
    ('CUDA graph fp32, batch 1', True, False, False, 1),
    ('CUDA graph fp16 channels_last, batch 1', True, True, True, 1),
    ('CUDA graph fp16 channels_last, batch 64', True, True, True, 64),
]


def cuda_latency(model, graph, half, channels_last, batch, size=416, runs=20):
    """Median seconds of one call of `deploy.inference.prepare`'s model (CUDA events)."""
    run = prepare(model, 'cuda', half=half, channels_last=channels_last, graph=graph)
    x = torch.rand(batch, 3, size, size, device='cuda')
    for _ in range(3):
        run(x)
    times = []
    for _ in range(runs):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        run(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del run
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def cuda_section():
    """YOLOv3 at 416 (70% zero gammas), its shortcut 0.5 cut (round-to 8), and a plan
    with the same parameter count ranked by |gamma| per ms saved on this GPU (table at
    batch 64, fp16, channels_last; exact zeros broken by the ms they save), under each
    of CUDA_SETTINGS: [{'setting', 'model', 'ms', 'params'}]."""
    model = zeroed_model('cfg/yolov3.cfg', 'shortcut', 416)
    pruned = prune(model, plan_masks(model, 'shortcut', 0.5, round_to=8))[1].eval()
    table = latency_table(model, 'shortcut', 416, TorchTimer('cuda', 64, 'fp16', True))
    ranking = _latency_ranking(model, 'shortcut', table, rank_channels(model, 'shortcut', 'gamma'),
                               floor=1e-6)
    budget, low, high = count_parameters(pruned), 0.0, 0.99
    for _ in range(14):  # the smallest percent whose compact model has at most `budget`
        middle = (low + high) / 2
        plan = plan_masks(model, 'shortcut', middle, 0.05, 8, ranking=ranking)
        low, high = (low, middle) if compact_cost(model, plan.masks, 416)[0] <= budget \
            else (middle, high)
    latency_cut = prune(model, plan_masks(model, 'shortcut', high, 0.05, 8, ranking=ranking))[1]
    models = [('original', model), ('shortcut 0.5, round-to 8', pruned),
              ('same params, --cost latency (GPU table)', latency_cut.eval())]
    return [{'setting': label, 'model': name, 'params': count_parameters(net),
             'ms': cuda_latency(net, *setting) * 1e3}
            for label, *setting in CUDA_SETTINGS for name, net in models]


def cuda_table(rows):
    names = list(dict.fromkeys(r['model'] for r in rows))
    lines = [f'{torch.cuda.get_device_name()}, torch {torch.__version__}, medians of 20 calls '
             '(CUDA events), deploy.inference.prepare (fused BN); ms (speed-up over the '
             'original):', '', '| setting | ' + ' | '.join(names) + ' |',
             '|---' * (len(names) + 1) + '|']
    for setting in dict.fromkeys(r['setting'] for r in rows):
        ms = {r['model']: r['ms'] for r in rows if r['setting'] == setting}
        lines.append(f'| {setting} | ' + ' | '.join(
            f'{ms[n]:.2f}' + ('' if n == names[0] else f' ({ms[names[0]] / ms[n]:.2f}x)')
            for n in names) + ' |')
    return '\n'.join(lines)


# ---------------------------------------------------------------- report

def ratio_cell(seconds, base, mac_ratio):
    if seconds is None:
        return ''
    speedup = base / seconds
    return f'{seconds * 1e3:.1f} ({speedup:.2f}x, eff {speedup / mac_ratio:.2f})'


def main_table(results):
    lines = ['| model | pruning | MAC cut | params kept | PyTorch fused ms | ORT FP32 ms | '
             'ORT INT8 ms | INT8 vs FP32 | mAP@0.5 FP32 / INT8 |',
             '|---|---|---|---|---|---|---|---|---|']
    for label, size, rows in results:
        base = rows['original']
        for name, row in rows.items():
            mac_ratio = base['macs'] / row['macs']
            cells = [ratio_cell(row.get(r), base.get(r), mac_ratio) if name != 'original'
                     else f'{row[r] * 1e3:.1f}' if r in row else ''
                     for r in ('torch', 'fp32', 'int8')]
            int8 = f'{row["fp32"] / row["int8"]:.2f}x' if 'int8' in row else ''
            maps = (f'{row["map_fp32"]:.3f} / {row["map_int8"]:.3f}' if 'map_int8' in row
                    else '')
            lines.append(f'| {label} {size} | {name} | {mac_ratio:.2f}x | '
                         f'{row["params"] / base["params"]:.1%} | ' + ' | '.join(cells)
                         + f' | {int8} | {maps} |')
    return '\n'.join(lines)


def sweep_table(sweep):
    lines = ['| model | mode at 0.5 | round-to | params kept | MAC cut | PyTorch fused ms | '
             'ORT FP32 ms | ORT INT8 ms |', '|---|---|---|---|---|---|---|---|']
    for (label, mode), rows in sweep.items():
        base = rows['original']
        for name, row in rows.items():
            mac_ratio = base['macs'] / row['macs']
            cells = [ratio_cell(row[r], base[r], mac_ratio) if name != 'original'
                     else f'{row[r] * 1e3:.1f}' for r in ('torch', 'fp32', 'int8')]
            lines.append(f'| {label} 416 | {mode} | {name} | {row["params"] / base["params"]:.1%}'
                         f' | {mac_ratio:.2f}x | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def profile_table(profiles):
    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p[0]},
                 key=lambda op: -max(p[0].get(op, 0) for p in profiles.values()))
    lines = ['| op type | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    totals = {n: sum(p[0].values()) for n, p in profiles.items()}
    for op in ops[:10]:
        lines.append(f'| {op} | ' + ' | '.join(
            f'{profiles[n][0].get(op, 0):.2f} ({profiles[n][0].get(op, 0) / totals[n]:.0%})'
            for n in names) + ' |')
    lines.append('| all nodes | ' + ' | '.join(f'{totals[n]:.2f}' for n in names) + ' |')
    layers = ['', 'By layer: the nodes of conv layers (conv, activation) against the rest '
              '(shortcut adds, routes, upsampling, layout reorders, the decode):', '',
              '| model | conv layers ms | GMACs | GMAC/s | other nodes ms |', '|---|---|---|---|---|']
    for n in names:
        conv_ms, gmacs, other_ms = profiles[n][2]
        layers.append(f'| {n} | {conv_ms:.2f} | {gmacs:.2f} | {gmacs / conv_ms * 1e3:.0f} | '
                      f'{other_ms:.2f} |')
    slowest = ['', 'Slowest nodes (ms per run):']
    for n in names:
        slowest.append(f'- {n}: ' + ', '.join(f'{node} {ms:.2f}' for node, ms in profiles[n][1]))
    return '\n'.join(lines + layers + slowest)


def plot(results, sweep, path):
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colours = {'torch': 'tab:blue', 'fp32': 'tab:orange', 'int8': 'tab:green'}
    labels = {'torch': 'PyTorch fused', 'fp32': 'ORT FP32', 'int8': 'ORT INT8'}
    markers = dict(zip([label for label, _, _ in results], 'osD^v'))
    top = 1.0
    for label, _, rows in results:
        base = rows['original']
        for name, row in rows.items():
            if name == 'original':
                continue
            cut = base['macs'] / row['macs']
            top = max(top, cut)
            for runtime in ('torch', 'fp32', 'int8'):
                if runtime in row:
                    left.scatter(cut, base[runtime] / row[runtime], color=colours[runtime],
                                 marker=markers[label])
    line = np.linspace(1, top * 1.05, 10)
    left.plot(line, line, 'k--', lw=0.8, label='speed-up = MAC cut')
    left.plot(line, 0.6 * line, 'k:', lw=0.8, label='efficiency 0.6')
    for runtime, colour in colours.items():
        left.scatter([], [], color=colour, label=labels[runtime])
    for label, marker in markers.items():
        left.scatter([], [], color='grey', marker=marker, label=label)
    left.set(xlabel='MAC cut (original / pruned)', ylabel='speed-up, batch 1',
             title='Speed-up against the MAC cut')
    left.legend(fontsize=8)
    for (label, mode), rows in sweep.items():
        base = rows['original']
        points = [(row['params'] / base['params'], row['fp32'] / base['fp32'], name)
                  for name, row in rows.items() if name != 'original']
        right.plot([p[0] for p in points], [p[1] for p in points], 'o-', label=f'{label} {mode}')
        for x, y, name in points:
            right.annotate(name, (x, y), fontsize=7)
    right.set(xlabel='parameters kept (share of original)',
              ylabel='ORT FP32 latency (share of original)', title='--round-to at --percent 0.5')
    if sweep:
        right.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--output', default='benchmarks/speed')
    parser.add_argument('--families', default=','.join(f[0] for f in FAMILIES),
                        help='comma-separated family labels to run (default: all)')
    parser.add_argument('--no-sweep', action='store_true')
    parser.add_argument('--no-latency-cost', action='store_true',
                        help='skip the --cost latency plans (YOLOv3 416, demo YOLOv3 128)')
    parser.add_argument('--no-cuda', action='store_true', help='skip the CUDA table')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    wanted = args.families.split(',')
    demo.ensure_demo_data()
    results, built, sweep, profiles, latency_cases, cuda = [], {}, {}, {}, [], []
    with tempfile.TemporaryDirectory() as folder:
        for family in FAMILIES:
            label, _, size, source, _ = family
            if label not in wanted:
                continue
            is_demo = source.endswith(('.pt', '.weights'))
            models = build(family)
            built[label] = models
            # the demo models run in about a millisecond: more rounds, same wall time
            rows = time_family(models, size, folder, args.threads,
                               args.rounds * (5 if is_demo else 1),
                               calibration_images(size, is_demo), tag=f'f{len(results)}-')
            if is_demo:
                demo_maps(rows, size)
            results.append((label, size, rows))
            print(main_table([results[-1]]), f'\n{time.perf_counter() - start:.0f} s', flush=True)
        for label, mode in ([] if args.no_sweep else SWEEP):
            if label not in built:
                continue
            original = built[label][0][1]
            models = [('original', original)] + [
                (str(n or ('powers of 2' if mode == 'regular' else 'none')),
                 prune(original, plan_masks(original, mode, 0.5, round_to=n))[1].eval())
                for n in ROUND_TO]
            sweep[(label, mode)] = time_family(models, 416, folder, args.threads, args.rounds,
                                               calibration_images(416, False),
                                               tag=f's{len(sweep)}-')
            print(sweep_table({(label, mode): sweep[(label, mode)]}),
                  f'\n{time.perf_counter() - start:.0f} s', flush=True)
        if not args.no_latency_cost:
            latency_cases = latency_cost_section(folder, args.rounds, args.threads)
            print(latency_cost_table(latency_cases), f'\n{time.perf_counter() - start:.0f} s',
                  flush=True)
        if torch.cuda.is_available() and not args.no_cuda:
            cuda = cuda_section()
            print(cuda_table(cuda), flush=True)
        for label, size, rows in results:
            names = {'YOLOv3': ['original', 'shortcut 0.5', 'shortcut 0.5, round-to 8',
                                'regular 0.5, round-to 8'],
                     'demo YOLOv3': ['shortcut 0.5, layer-keep 0.01']}.get(label, [])
            models = dict(built[label])
            for name in names:
                for runtime in ('fp32', 'int8') if label.startswith('demo') else ('fp32',):
                    profiles[f'{label} {name} {runtime}'] = ort_profile(
                        rows[name]['paths'][runtime], size, args.threads, models[name])
    seconds = time.perf_counter() - start
    setup = (f'Batch 1, {args.threads} threads (torch.set_num_threads and onnxruntime '
             f'intra-op, no spinning), median of {args.rounds} rounds ({5 * args.rounds} for '
             f'the demo models), the models of a family interleaved within each runtime; torch {torch.__version__}, onnxruntime '
             f'{__import__("onnxruntime").__version__}, CPU: {cpu_name()}. '
             f'Cells: latency ms (speed-up over the original in the same runtime, '
             f'efficiency = speed-up / MAC cut). Whole run {seconds:.0f} s.')
    text = '\n\n'.join(['# Latency against the MAC cut', setup, main_table(results),
                        '## --round-to at --percent 0.5', sweep_table(sweep),
                        '## --cost latency (onnxruntime FP32 table)',
                        latency_cost_table(latency_cases) if latency_cases else '',
                        '## CUDA (batch 1 and 64, eager and CUDA-graph replay)',
                        cuda_table(cuda) if cuda else 'no CUDA device in this run',
                        '## Where onnxruntime spends the time (ms per run by op type)',
                        profile_table(profiles) if profiles else '']) + '\n'
    atomic_write_text(args.output + '.md', text)
    serial = [{'family': label, 'size': size,
               'rows': {n: {k: v for k, v in r.items() if k != 'paths'} for n, r in rows.items()}}
              for label, size, rows in results]
    sweep_serial = [{'family': label, 'mode': mode,
                     'rows': {n: {k: v for k, v in r.items() if k != 'paths'}
                              for n, r in rows.items()}}
                    for (label, mode), rows in sweep.items()]
    latency_serial = [{'family': label, 'target': target,
                       'rows': {n: {k: v for k, v in r.items() if k != 'paths'}
                                for n, r in rows.items()}}
                      for label, target, rows in latency_cases]
    atomic_write_text(args.output + '.json', json.dumps(
        {'results': serial, 'sweep': sweep_serial, 'latency_cost': latency_serial,
         'cuda': cuda,
         'profiles': {k: {'by_op': v[0], 'slowest': v[1], 'conv_ms_gmacs_other_ms': v[2]}
                      for k, v in profiles.items()}},
        indent=1) + '\n')
    plot(results, sweep, args.output + '.png')
    print(text)


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if 'model name' in line)
    except (OSError, StopIteration):
        return 'unknown'


if __name__ == '__main__':
    main()
