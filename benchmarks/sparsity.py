"""Sparsity penalties and schedules: how soon the model prunes without loss.

    python benchmarks/sparsity.py            # every config, then the report
    python benchmarks/sparsity.py --configs l1-0.002,scaled-0.01

Start: the shipped baseline demo YOLOv3 (weights/yolov3-shapes.pt, never
sparsity-trained), shortcut mode (`--prune 1`). Each config is one train.py run (batch
16, the defaults otherwise) with the monitor at `--target-params 0.6`: after every
epoch, the mAP@0.5 of the model pruned to remove 60% of the parameters with the prune
scripts' defaults (consumer criterion per parameter, at most 90% of a unit, widths
rounded to 8) and BN-recalibrated on 128 training images, no fine-tuning. Two recipes:
12 epochs at lr 0.002 (cos), every penalty and schedule and l1 at three values of s;
20 epochs at lr 0.01 with the step schedule (the shipped sparse model's recipe, which
ran 50), the penalties at s 0.005. Per config: the first epoch at which the pruned mAP
is within 1 point (0.01) of both that epoch's unpruned mAP and the baseline's, and the
pruned mAP at 85% of the parameters after the last epoch. The tiny demo baseline and
the shipped sparse YOLOv3 are measured as they are (no training). Runs are cached in
--work-dir (a config whose results.csv is complete is not rerun); writes
benchmarks/sparsity.md, .png and .json.
"""
import argparse
import csv
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
from cli import demo  # noqa: E402
from cli.prune import CALIBRATION_IMAGES  # noqa: E402
from darknet.cfg import parse_data_cfg  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_weights  # noqa: E402
from data.datasets import DataFile, create_dataloader  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from train import main as train_main  # noqa: E402
from training.sparsity import Monitor  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402
from utils.plots import pyplot, save_figure  # noqa: E402

# name -> (epochs, train.py flags); -sr --prune 1 --target-params 0.6 are added
SHORT = ['--lr', '0.002']
STEP = ['--lr', '0.01', '--schedule', 'step']
CONFIGS = {
    'l1-0.002': (12, SHORT + ['--s', '0.002']),
    'l1-0.01': (12, SHORT + ['--s', '0.01']),
    'l1-0.05': (12, SHORT + ['--s', '0.05']),
    'l1-0.01-proximal': (12, SHORT + ['--s', '0.01', '--proximal']),
    'group-0.01': (12, SHORT + ['--s', '0.01', '--penalty', 'group']),
    'scaled-0.01': (12, SHORT + ['--s', '0.01', '--penalty', 'scaled']),
    'l1-0.01-warmup': (12, SHORT + ['--s', '0.01', '--s-schedule', 'warmup']),
    'l1-0.01-decay': (12, SHORT + ['--s', '0.01', '--s-schedule', 'decay']),
    'step: l1-0.005': (20, STEP + ['--s', '0.005']),
    'step: l1-0.005-proximal': (20, STEP + ['--s', '0.005', '--proximal']),
    'step: group-0.005': (20, STEP + ['--s', '0.005', '--penalty', 'group']),
    'step: scaled-0.005': (20, STEP + ['--s', '0.005', '--penalty', 'scaled']),
}
WITHIN = 0.01  # "within 1 point"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--configs', default=','.join(CONFIGS))
    parser.add_argument('--work-dir', default='runs/bench16')
    parser.add_argument('--output', default='benchmarks/sparsity')
    return parser


def pruned_map(cfg, weights, mode, target):
    """(unpruned mAP@0.5, the monitor's pruned mAP@0.5 at `target`) of a checkpoint."""
    model = load_weights(Darknet(cfg), weights).eval()
    options = parse_data_cfg(demo.DATA)
    loader, _ = create_dataloader(options['valid'], demo.IMG_SIZE, 16, options['classes'],
                                  rect=True, workers=2, stride=model.stride)
    score = lambda m: evaluate(m, loader, options['classes'], progress=False).metrics['map50']
    load = lambda: DataFile(demo.DATA).training_batches(CALIBRATION_IMAGES, demo.IMG_SIZE, 16,
                                                        model.stride, 2)
    monitor = Monitor(mode, 'params', target, demo.IMG_SIZE, score, load)
    return score(model), monitor.measure(model)


def read_rows(folder):
    path = os.path.join(folder, 'results.csv')
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8') as f:
        return list(csv.DictReader(f))


def run_config(name, args, baseline):
    folder = os.path.join(args.work_dir, name.replace('step: ', 'step-'))
    epochs, flags = CONFIGS[name]
    rows = read_rows(folder)
    if len(rows) < epochs or not os.path.isfile(os.path.join(folder, 'last.pt')):
        start = time.perf_counter()
        train_main(['--weights', demo.YOLOV3['weights'], '--epochs', str(epochs), '-sr',
                    '--prune', '1', '--target-params', '0.6', '--output-dir', folder,
                    '--exist-ok', *flags])
        atomic_write_text(os.path.join(folder, 'seconds.txt'),
                          f'{time.perf_counter() - start:.1f}\n')
        rows = read_rows(folder)
    plain = [float(r['map50']) for r in rows]
    pruned = [float(r['pruned_map50']) for r in rows]
    reached = next((int(r['epoch']) for r, a, b in zip(rows, plain, pruned)
                    if b >= max(a, baseline) - WITHIN), None)
    _, at85 = pruned_map(demo.YOLOV3['cfg'], os.path.join(folder, 'last.pt'), 'shortcut', 0.85)
    seconds = float(open(os.path.join(folder, 'seconds.txt')).read())
    return {'flags': flags, 'map50': plain, 'pruned60': pruned, 'epochs_to_within': reached,
            'pruned85_last': at85, 'seconds': seconds,
            'train_seconds': [float(r['seconds']) for r in rows]}


def report(results, start, args):
    lines = [f'`python benchmarks/sparsity.py` on {os.cpu_count()} CPU cores. Start: the '
             f'baseline demo YOLOv3 (`{demo.YOLOV3["weights"]}`, never sparsity-trained), '
             'shortcut mode (`--prune 1`), train.py with the flags shown (batch 16, the '
             'defaults otherwise; `--lr 0.002` runs use the cos schedule), 128x128 shapes '
             'set (1000 training, 200 validation images). Within 1 point: the pruned mAP is '
             'at most 0.01 below both that epoch\'s unpruned mAP and the baseline\'s. '
             'Pruned: the monitor\'s figure, i.e. prune_shortcut.py with its defaults at '
             '`--target-params` (share of the parameters removed), BN means recalibrated on '
             '128 training images, no fine-tuning; mAP@0.5 on the validation set.', '',
             f'At epoch 0 the baseline scores {start["yolov3"][0]:.3f} unpruned and '
             f'{start["yolov3"][1]:.3f} pruned at 60%; the tiny demo baseline '
             f'(`{demo.TINY["weights"]}`, tiny mode) {start["tiny"][0]:.3f} and '
             f'{start["tiny"][1]:.3f}: the tiny model is already within 1 point before any '
             'sparsity training. For comparison, the shipped sparse demo YOLOv3 '
             f'(`{demo.YOLOV3["sparse_weights"]}`: the baseline after 50 epochs of l1 at s 0.005 '
             'and lr 0.01, step schedule) scores '
             f'{start["yolov3-sparse"][0]:.3f} unpruned, {start["yolov3-sparse"][1]:.3f} pruned '
             f'at 60% and {start["yolov3-sparse-85"][1]:.3f} at 85%.', '',
             '| config | epochs until pruned@60% within 1 point | pruned@60% after the last '
             'epoch | unpruned after the last epoch | pruned@85% after the last epoch | '
             'minutes |', '|---|---:|---:|---:|---:|---:|']
    for name, r in results.items():
        reached = (str(r['epochs_to_within']) if r['epochs_to_within'] is not None
                   else f'not in {len(r["map50"])}')
        lines.append(f'| {name} (`{" ".join(r["flags"])}`) | {reached} | {r["pruned60"][-1]:.3f} '
                     f'| {r["map50"][-1]:.3f} | {r["pruned85_last"]:.3f} | '
                     f'{r["seconds"] / 60:.1f} |')
    atomic_write_text(args.output + '.md', '\n'.join(lines) + '\n')
    atomic_write_text(args.output + '.json', json.dumps({'start': start, 'configs': results},
                                                        indent=1) + '\n')
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, r in results.items():
        epochs = list(range(0, len(r['map50']) + 1))
        style = 'o--' if name.startswith('step') else 'o-'  # the lr 0.01 recipe dashed
        line, = axes[0].plot(epochs, [start['yolov3'][1]] + r['pruned60'], style, ms=3,
                             label=name)
        axes[1].plot(epochs, [start['yolov3'][0]] + r['map50'], style, ms=3,
                     color=line.get_color(), label=name)
    axes[0].set_title('pruned@60% of the parameters, BN recalibrated', fontsize=10)
    axes[1].set_title('unpruned', fontsize=10)
    for axis in axes:
        axis.set_xlabel('sparsity-training epoch')
        axis.grid(alpha=0.3)
    axes[0].set_ylabel('mAP@0.5')
    axes[1].legend(fontsize=7, ncol=2)
    figure.suptitle('Demo YOLOv3 baseline, shortcut mode', fontsize=10)
    figure.tight_layout()
    save_figure(figure, args.output + '.png')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    start = {'yolov3': pruned_map(demo.YOLOV3['cfg'], demo.YOLOV3['weights'], 'shortcut', 0.6),
             'tiny': pruned_map(demo.TINY['cfg'], demo.TINY['weights'], 'tiny', 0.6),
             # the shipped sparse model: 50 epochs of l1 at s 0.005, lr 0.01 (docs/training.md)
             'yolov3-sparse': pruned_map(demo.YOLOV3['cfg'], demo.YOLOV3['sparse_weights'],
                                         'shortcut', 0.6),
             'yolov3-sparse-85': pruned_map(demo.YOLOV3['cfg'], demo.YOLOV3['sparse_weights'],
                                            'shortcut', 0.85)}
    print(f'epoch 0: {start}', flush=True)
    results = {}
    for name in args.configs.split(','):
        results[name] = run_config(name, args, start['yolov3'][0])
        print(f'{name}: {results[name]["epochs_to_within"]} epochs, '
              f'pruned@85% {results[name]["pruned85_last"]:.3f}', flush=True)
        report(results, start, args)


if __name__ == '__main__':
    main()
