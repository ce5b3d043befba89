"""Training that may end before its last epoch and resumes to the very same weights.

The engine's `train` (training/engine.py) runs every epoch of `TrainSettings.epochs`.
The pipeline (cli/pipeline.py) needs two things more, and `train_until` adds them to the
engine's own steps (`setup`, `run_epoch`, `epoch_end`, the monitor, `commit_epoch`,
`finish`):

1. A stop rule: `stop(row)` is asked after each committed epoch, with that epoch's row of
   results.csv as read back from the file (so the rule sees the same rounded figures
   whether the run went straight through or resumed). A run stopped by a kill right after
   the epoch that met the rule asks it again of that row on resume, and trains no more.
2. Resuming bit for bit. The engine seeds torch once per run, so a resumed run draws other
   augmentations than an uninterrupted one. Here torch's, numpy's and Python's streams are
   seeded from (seed, epoch) before each epoch, and the training loader starts fresh
   workers each epoch (persistent ones would carry their streams over from the epochs
   before), so epoch k is the same whether the process trained epochs 1..k-1 or resumed
   them from last.pt, which holds the weights, the average, the optimizer and the monitor.

Nothing is saved on a signal: commit_epoch writes last.pt last and atomically, holding
Ctrl-C and SIGTERM while it writes, so last.pt always holds the last whole epoch.
"""
import csv
import dataclasses
import os
import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.engine import (Stop, commit_epoch, epoch_end, finish, memory_guard, print_epoch,
                             run_epoch, setup)


def committed_epochs(folder):
    """How many epochs the run in `folder` has committed (0 without a last.pt)."""
    last = os.path.join(folder, 'last.pt')
    if not os.path.isfile(last):
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        # mmap: the tensors stay on disk; only the epoch count is read
        checkpoint = torch.load(last, map_location='cpu', weights_only=True, mmap=True)
    return int(checkpoint['epoch']) + 1


def results_row(folder, epoch):
    """Row `epoch` (1-based) of the run's results.csv as {column: float} (an empty cell,
    an epoch the monitor skipped, is None), or None when the file has no such row."""
    path = os.path.join(folder, 'results.csv')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8', newline='') as f:
        for row in csv.DictReader(f):
            if row.get('epoch') and int(row['epoch']) == epoch:
                return {k: float(v) if v not in ('', None) else None for k, v in row.items()}
    return None


def seed_epoch(seed, epoch):
    """Every random stream the training reads, seeded from (seed, epoch) alone."""
    value = (seed + 1) * 1_000_003 + epoch
    torch.manual_seed(value)
    np.random.seed(value % 2 ** 32)
    random.seed(value)


def fresh_workers(loader):
    """`loader` rebuilt from its parts with workers started anew at each epoch: their
    streams then come from the epoch's seed (see seed_epoch). Without workers, as is."""
    if loader.num_workers == 0:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      worker_init_fn=loader.worker_init_fn, pin_memory=loader.pin_memory,
                      persistent_workers=False)


def train_until(settings, stop=None):
    """Train as `settings` (TrainSettings; one process) say, resuming from last.pt in its
    output folder when one is there (its `resume` field is ignored), until the last epoch
    or until `stop(row)` is true of an epoch's results row. Returns {'epochs': epochs
    committed, 'stopped': whether the rule ended it, 'row': the last epoch's row}."""
    folder = settings.output_dir
    done = committed_epochs(folder)
    row = results_row(folder, done) if done else None
    if done >= settings.epochs or (stop is not None and row is not None and stop(row)):
        return {'epochs': done, 'stopped': done < settings.epochs, 'row': row}
    run = setup(dataclasses.replace(settings, resume=done > 0))
    run.loader = fresh_workers(run.loader)
    epoch, stopped = run.start_epoch, False
    try:
        for epoch in range(run.start_epoch, settings.epochs):
            row = train_epoch(run, epoch)
            if stop is not None and stop(row):
                stopped = epoch + 1 < settings.epochs
                break
    except Stop:  # SIGTERM held during the epoch's writes: act on it as run_cli does
        raise KeyboardInterrupt() from None
    finish(run, epoch)
    return {'epochs': epoch + 1, 'stopped': stopped, 'row': row}


def train_epoch(run, epoch):
    """One epoch as the engine runs it (train, validate, the monitor, commit, print),
    seeded from (seed, epoch); returns its results row as written."""
    settings = run.settings
    seed_epoch(settings.seed, epoch)
    metrics = run_epoch(run, epoch)
    with memory_guard(settings, 'validation', run.img_size):
        metrics.update(epoch_end(run.average, run.valid_loader, run.data.classes, run.mode))
    due = run.monitor is not None and run.monitor.due(epoch, settings.epochs)
    with memory_guard(settings, 'the pruned-mAP monitor', run.img_size):
        metrics['pruned_map50'] = run.monitor.measure(run.average) if due else ''
    commit_epoch(run, epoch, metrics)
    print_epoch(epoch, settings.epochs, metrics, run.monitor)
    return results_row(settings.output_dir, epoch + 1)
