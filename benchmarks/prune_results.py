"""The results table: every prune mode on the trained demo models, before and after a
short fine-tune (plain and with distillation from the unpruned model).

    python benchmarks/prune_results.py [--finetune-epochs 20] [--targets 0.6,0.85]

For each demo model (the narrow YOLOv3 and YOLOv3-tiny in weights/) the rows are the
normally trained baseline, the sparsity-trained model, and each mode at each target
share of parameters removed (the percent found by the prune scripts' --target-params),
then layer pruning (whole residual blocks, alone and with shortcut-mode channels).
Each pruned row gives mAP@0.5 on the demo validation set right after pruning and after
fine-tuning for --finetune-epochs, plain and distilled, with parameters, GMACs, the
.weights size and the batch-1 CPU latency of PyTorch and ONNX Runtime (when installed).
Latencies are measured at the end, all models of one family interleaved round by round,
so a busy machine slows every model alike and the ratios hold.

Writes benchmarks/results.md (the README's table), benchmarks/results.png (mAP against
the share of parameters removed, one colour per mode) and benchmarks/results.json;
pruned and fine-tuned models go to --work-dir.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
from cli import demo  # noqa: E402
from darknet.cfg import parse_data_cfg  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import darknet_float_count, load_weights  # noqa: E402
from data.datasets import create_dataloader  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from pruning.plan import find_percent  # noqa: E402
from pruning.report import write_outputs  # noqa: E402
from pruning.surgery import prune  # noqa: E402
from train import main as train_main  # noqa: E402
from utils.errors import UserInputError  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402
from utils.plots import pyplot, save_figure  # noqa: E402
from utils.torch_utils import count_macs, count_parameters, time_sync  # noqa: E402

NOTES = []  # targets a mode cannot reach, listed under the table
# Batch-1 latency of these small models on one thread: with two, a forward pass slows
# 100x or more whenever anything else runs (the threads wait on each other), and one
# thread per inference is how a CPU server usually runs them.
LATENCY_THREADS = 1
# Without shortcuts, normal and tiny mode prune the same convs: the tiny family runs tiny.
FAMILIES = {'YOLOv3': (demo.YOLOV3, ('normal', 'regular', 'shortcut')),
            'YOLOv3-tiny': (demo.TINY, ('regular', 'tiny'))}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--finetune-epochs', type=int, default=20)
    parser.add_argument('--finetune-lr', type=float, default=0.005)
    parser.add_argument('--targets', default='0.6,0.85',
                        help='shares of the parameters to remove, comma-separated')
    parser.add_argument('--layer-keep', type=float, default=0.01,
                        help="as the prune scripts' flag: sparsity training empties whole "
                             'layers, which keep one channel')
    parser.add_argument('--layers', default='8', help='residual blocks to remove, for the '
                        'layer-pruning rows (the last one also gets shortcut channels)')
    parser.add_argument('--families', default=','.join(FAMILIES))
    parser.add_argument('--latency-rounds', type=int, default=30)
    parser.add_argument('--work-dir', default='runs/benchmark')
    parser.add_argument('--output', default='benchmarks/results',
                        help='stem of the .md, .png and .json written')
    return parser


# ---------------------------------------------------------------- measurements

def valid_loader(model):
    options = parse_data_cfg(demo.ensure_demo_data())
    loader, _ = create_dataloader(options['valid'], demo.IMG_SIZE, 16, options['classes'],
                                  rect=True, workers=2, stride=model.stride)
    return loader, options['classes']


def map50(model):
    loader, classes = valid_loader(model)
    return evaluate(model.eval(), loader, classes, progress=False).metrics['map50']


def finetune(cfg, weights, folder, args, teacher=None):
    """Fine-tune the pruned files for --finetune-epochs; the last epoch's mAP@0.5 (not the
    best epoch's: picking the best on the validation set would flatter the row)."""
    argv = ['--cfg', cfg, '--weights', weights, '--data', demo.DATA, '--img-size',
            str(demo.IMG_SIZE), '--epochs', str(args.finetune_epochs), '--lr',
            str(args.finetune_lr), '--output-dir', folder]
    if teacher is not None:
        argv += ['--teacher-cfg', teacher[0], '--teacher-weights', teacher[1]]
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(argv)
    with open(os.path.join(folder, 'results.csv'), encoding='utf-8') as f:
        return float(list(csv.DictReader(f))[-1]['map50'])


def interleaved_latency(models, rounds):
    """Median batch-1 forward seconds of each model, one pass of each per round, on one
    thread (see LATENCY_THREADS)."""
    x = torch.rand(1, 3, demo.IMG_SIZE, demo.IMG_SIZE)
    times = {name: [] for name in models}
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    with torch.no_grad():
        for model in models.values():
            model.eval()(x)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                start = time_sync(torch.device('cpu'))
                model(x)
                times[name].append(time_sync(torch.device('cpu')) - start)
    torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


def onnx_latencies(models, rounds):
    """ONNX Runtime medians, interleaved the same way; None where onnxruntime is missing."""
    from deploy.onnx_export import export_onnx, ort_session, require_onnx
    try:
        require_onnx()
    except UserInputError as e:
        NOTES.append(f'no ONNX Runtime column: {e}')
        return {name: None for name in models}
    import numpy as np
    x = np.random.default_rng(0).random((1, 3, demo.IMG_SIZE, demo.IMG_SIZE), np.float32)
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            path = os.path.join(folder, f'{len(sessions)}.onnx')
            export_onnx(model, path, demo.IMG_SIZE)
            sessions[name] = ort_session(path, threads=LATENCY_THREADS)
        times = {name: [] for name in models}
        for session in sessions.values():
            session.run(None, {session.get_inputs()[0].name: x})
        for _ in range(rounds):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {session.get_inputs()[0].name: x})
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def describe(model):
    return {'params': count_parameters(model), 'gmacs': count_macs(model, demo.IMG_SIZE) / 1e9,
            'size_mb': (20 + 4 * darknet_float_count(model)) / 1e6}


# ---------------------------------------------------------------- rows

def pruned_rows(family, spec, modes, sparse, args):
    """Each mode at each target: prune, measure, write, fine-tune plain and distilled."""
    rows, models = [], {}
    full = count_parameters(sparse)
    for mode in modes:
        for target in (float(t) for t in args.targets.split(',')):
            try:
                percent, plan, _ = find_percent(sparse, mode, target, 'params', demo.IMG_SIZE,
                                                args.layer_keep)
            except UserInputError as e:  # an unreachable target: a note under the table
                NOTES.append(f'{family}, {mode} mode, {target:.0%} of the parameters: {e}')
                print(NOTES[-1])
                continue
            compact = prune(sparse, plan)[1]
            name = f'{mode} {percent:.3f}'
            widths = [int(m.sum()) for m in plan.masks.values() if not m.all()]
            rows.append(pruned_row(family, name, mode, compact, full, spec, args,
                                   {'percent': percent, 'target': target,
                                    'pruned_widths': sorted(set(widths))}))
            models[name] = compact
    return rows, models


def pruned_row(family, name, mode, compact, full, spec, args, extra):
    folder = os.path.join(args.work_dir, family, name.replace(' ', '-'))
    cfg, weights = os.path.join(folder, 'pruned.cfg'), os.path.join(folder, 'pruned.weights')
    os.makedirs(folder, exist_ok=True)
    write_outputs(compact, cfg, weights)
    row = {'family': family, 'model': name, 'mode': mode, **extra, **describe(compact),
           'removed': 1 - count_parameters(compact) / full, 'map_pruned': map50(compact)}
    started = time.time()
    row['map_finetuned'] = finetune(cfg, weights, os.path.join(folder, 'finetune'), args)
    row['map_distilled'] = finetune(cfg, weights, os.path.join(folder, 'distill'), args,
                                    teacher=(spec['cfg'], spec['sparse_weights']))
    row['finetune_seconds'] = (time.time() - started) / 2
    print(f'{family} {name}: {row["removed"]:.1%} of the parameters removed, mAP@0.5 '
          f'{row["map_pruned"]:.4f} pruned, {row["map_finetuned"]:.4f} fine-tuned, '
          f'{row["map_distilled"]:.4f} distilled', flush=True)
    return row


def layer_rows(family, spec, sparse, args):
    """Whole residual blocks removed (and then shortcut-mode channels, on the last count)."""
    from pruning.layer_prune import layer_prune
    rows, models = [], {}
    full = count_parameters(sparse)
    counts = [int(n) for n in args.layers.split(',')]
    for n in counts:
        for percent in ([None, 0.5] if n == counts[-1] else [None]):
            compact = layer_prune(sparse, n, percent,
                                  args.layer_keep if percent else None).compact
            name = f'layer {n}' + (f' + shortcut {percent:g}' if percent else '')
            rows.append(pruned_row(family, name, 'layer', compact, full, spec, args,
                                   {'percent': percent, 'blocks': n}))
            models[name] = compact
    return rows, models


def family_rows(family, args):
    spec, modes = FAMILIES[family]
    baseline = load_weights(Darknet(spec['cfg']), demo.require_demo_weights(spec['weights']))
    sparse = load_weights(Darknet(spec['cfg']),
                          demo.require_demo_weights(spec['sparse_weights'])).eval()
    rows = [{'family': family, 'model': name, 'mode': '', **describe(model),
             'removed': 0.0, 'map_pruned': map50(model)}
            for name, model in (('baseline', baseline), ('sparse', sparse))]
    # the control: the unpruned sparse model fine-tuned the same way, since more training
    # alone may add mAP that the pruned rows' fine-tuning would otherwise take credit for
    rows[1]['map_finetuned'] = finetune(spec['cfg'], spec['sparse_weights'],
                                        os.path.join(args.work_dir, family, 'sparse'), args)
    models = {'baseline': baseline, 'sparse': sparse}
    mode_rows, mode_models = pruned_rows(family, spec, modes, sparse, args)
    rows += mode_rows
    models.update(mode_models)
    if family == 'YOLOv3':
        more_rows, more_models = layer_rows(family, spec, sparse, args)
        rows += more_rows
        models.update(more_models)
    torch_ms = interleaved_latency(models, args.latency_rounds)
    onnx_ms = onnx_latencies(models, args.latency_rounds)
    for row in rows:
        row['latency_ms'] = torch_ms[row['model']] * 1e3
        row['onnx_ms'] = onnx_ms[row['model']] * 1e3 if onnx_ms[row['model']] else None
    return rows


# ---------------------------------------------------------------- outputs

def markdown(rows, args, seconds):
    def number(value, spec):
        return '' if value is None else format(value, spec)
    lines = ['| family | model | params | removed | GMACs | mAP@0.5 pruned | fine-tuned | '
             'distilled | PyTorch ms | ORT ms | .weights MB |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(
            f'| {r["family"]} | {r["model"]} | {r["params"] / 1e6:.3f}M | {r["removed"]:.1%} | '
            f'{r["gmacs"]:.3f} | {r["map_pruned"]:.3f} | {number(r.get("map_finetuned"), ".3f")} | '
            f'{number(r.get("map_distilled"), ".3f")} | {r["latency_ms"]:.2f} | '
            f'{number(r.get("onnx_ms"), ".2f")} | {r["size_mb"]:.2f} |')
    lines += ['', f'`python benchmarks/prune_results.py --finetune-epochs {args.finetune_epochs} '
              f'--finetune-lr {args.finetune_lr:g} --targets {args.targets} --layer-keep '
              f'{args.layer_keep:g} --layers {args.layers}`: {seconds / 60:.0f} min on {os.cpu_count()} CPU cores, '
              f'{torch.get_num_threads()} PyTorch threads for training. mAP@0.5 on the 200 validation images '
              f'at {demo.IMG_SIZE}x{demo.IMG_SIZE}; latency: median of '
              f'{args.latency_rounds} batch-1 passes on {LATENCY_THREADS} thread, models interleaved.']
    for r in rows:
        if r['mode'] == 'regular':
            widths = r['pruned_widths']
            power = all(w & (w - 1) == 0 for w in widths)
            NOTES.append(f'{r["family"]} {r["model"]}: the pruned layers keep '
                         f'{", ".join(map(str, widths))} channels'
                         + (', every one a power of two' if power else ''))
    lines += [''] + [f'- {note}' for note in NOTES]
    return '\n'.join(lines) + '\n'


def plot(rows, path):
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = dict(zip(['normal', 'regular', 'shortcut', 'tiny', 'layer'],
                       plt.rcParams['axes.prop_cycle'].by_key()['color']))
    for axis, family in zip(axes, FAMILIES):
        mine = [r for r in rows if r['family'] == family]
        if not mine:
            continue
        sparse = next(r for r in mine if r['model'] == 'sparse')
        axis.axhline(sparse['map_pruned'], color='grey', linestyle=':', label='sparse model')
        axis.axhline(sparse['map_finetuned'], color='grey', linestyle='--',
                     label='sparse model, fine-tuned the same way (control)')
        for mode, colour in colours.items():
            points = sorted((r for r in mine if r['mode'] == mode), key=lambda r: r['removed'])
            if not points:
                continue
            x = [100 * r['removed'] for r in points]
            axis.plot(x, [r['map_distilled'] for r in points], '-o', color=colour,
                      label=f'{mode}: fine-tuned, distilled')
            axis.plot(x, [r['map_finetuned'] for r in points], '-s', color=colour, alpha=0.6,
                      label=f'{mode}: fine-tuned')
            axis.plot(x, [r['map_pruned'] for r in points], '--x', color=colour, alpha=0.4,
                      label=f'{mode}: right after pruning')
        axis.set_title(family)
        axis.set_xlabel('parameters removed (%)')
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel('mAP@0.5 (shapes validation set)')
    figure.tight_layout()
    save_figure(figure, path)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    started = time.time()
    rows = []
    for family in args.families.split(','):
        rows += family_rows(family, args)
    seconds = time.time() - started
    table = markdown(rows, args, seconds)
    print(table)
    atomic_write_text(args.output + '.md', table)
    atomic_write_text(args.output + '.json', json.dumps(rows, indent=1) + '\n')
    plot(rows, args.output + '.png')
    print(f'wrote {args.output}.md, .json and .png')


if __name__ == '__main__':
    main()
