"""A run's files: checkpoints (last.pt, best.pt, best_pruned.pt), results.csv, and
the plots drawn from them (the gamma histogram, the monitor's curve).
"""
import csv
import dataclasses
import io
import os

import torch

from darknet.weights import torch_load
from data.datasets import default_img_size
from training.ema import ModelEMA
from utils.errors import UserInputError
from utils.fileio import atomic_output, atomic_write_text
from utils.plots import pyplot, save_figure
from utils.torch_utils import unwrap

RESULT_COLUMNS = ('epoch', 'box', 'obj', 'cls', 'distill', 'loss', 'precision', 'recall', 'map50',
                  'map50_95', 'f1', 'lr', 'gammas_below_0.01', 'max_safe_percent', 'seconds',
                  'pruned_map50')


def save_checkpoint(path, model, optimizer, epoch, best_fitness, settings, extra=None):
    """`extra`: more entries (the monitor's state, best_pruned.pt's pruned mAP).
    'img_size' is the side the run trains at (--img-size, else the cfg's width): the
    scripts that read the .pt take it as their default (cli.common.choose_img_size).
    `model` a `ModelEMA`: 'model' holds the average, 'ema' what --resume needs too."""
    if isinstance(model, ModelEMA):
        extra = {**(extra or {}), 'ema': model.resume_state()}
        model = model.module
    model = unwrap(model)
    checkpoint = {'epoch': epoch, 'best_fitness': best_fitness, 'model': model.state_dict(),
                  'img_size': default_img_size(model, getattr(settings, 'img_size', None)),
                  'optimizer': optimizer.state_dict(),
                  'cfg': {'hyperparams': model.hyperparams, 'layers': model.module_defs},
                  'args': {k: v for k, v in dataclasses.asdict(settings).items()
                           if isinstance(v, (str, int, float, bool, type(None)))},
                  **(extra or {})}
    with atomic_output(path) as f:
        torch.save(checkpoint, f)


def load_resume_checkpoint(path):
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: nothing to resume (no last.pt); start without --resume '
                             'or pass the --output-dir of the stopped run')
    checkpoint = torch_load(path, 'start the run again without --resume')
    if isinstance(checkpoint, dict) and {'model', 'optimizer'} <= set(checkpoint) \
            and 'cfg' not in checkpoint:
        # the ultralytics-era trainer (the seed project) saved no cfg and orders its
        # optimizer's parameter groups otherwise: its weights load, its run does not go on
        raise UserInputError(f'{path}: a checkpoint of the ultralytics-era train.py, which '
                             'this one cannot resume; start a new run from its weights: '
                             f'--weights {path} --output-dir <another folder>')
    if not isinstance(checkpoint, dict) or not {'epoch', 'model', 'optimizer', 'cfg'} <= set(checkpoint):
        raise UserInputError(f'{path}: not a train.py checkpoint; cannot resume from it')
    return checkpoint


def append_results(path, row):
    """Rewrite results.csv with one more row (atomically, so a kill leaves a whole file)."""
    old = open(path, encoding='utf-8').read() if os.path.isfile(path) else ''
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ','.join(RESULT_COLUMNS)
    first, _, rest = old.partition('\n')
    if header.startswith(first.rstrip('\r') + ','):
        # a run resumed from before a column was added: the new header, the old rows
        # (readers fill the missing last fields with empty values)
        old = header + '\n' + rest
    if not old:
        writer.writerow(RESULT_COLUMNS)
    writer.writerow([f'{row[k]:.6g}' if isinstance(row[k], float) else row[k]
                     for k in RESULT_COLUMNS])
    atomic_write_text(path, old + buffer.getvalue())


def trim_results(path, epochs):
    """Keep the header and the rows of epochs 1..`epochs` of results.csv: a run stopped
    after writing an epoch's row but before saving last.pt repeats that epoch on --resume."""
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8', newline='') as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= epochs]
    if kept != rows:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write_text(path, buffer.getvalue())


def plot_gamma_histogram(bn_modules, path, title):
    """Histogram of |gamma| over the prunable BN layers: what people read sparsity from."""
    plt = pyplot()
    gammas = torch.cat([bn.weight.detach().abs().cpu() for bn in bn_modules]).numpy()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(gammas, bins=100, color='tab:blue')
    axis.set_yscale('log')
    axis.set_xlim(left=0)
    axis.set_xlabel('|gamma| of prunable BatchNorm channels')
    axis.set_ylabel('channels')
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_pruned_map(folder, label, title):
    """mAP and the monitor's pruned mAP (`label`) per epoch, from the run `folder`'s
    results.csv (the whole run, also across --resume); returns the files written."""
    with open(os.path.join(folder, 'results.csv'), encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f))
    epochs = [int(row['epoch']) for row in rows]
    plain = [float(row['map50']) for row in rows]
    pruned = [(int(row['epoch']), float(row['pruned_map50'])) for row in rows
              if row.get('pruned_map50')]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(epochs, plain, 'o-', label='mAP@0.5')
    if pruned:
        axis.plot(*zip(*pruned), 's-', label=f'{label} mAP@0.5 (BN recalibrated)')
    axis.set_xlabel('epoch')
    axis.set_ylabel('mAP@0.5')
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    plot = os.path.join(folder, 'pruned_map.png')
    save_figure(figure, plot)
    best = os.path.join(folder, 'best_pruned.pt')
    return ([best] if os.path.isfile(best) else []) + [plot]
