"""What a prune run shows and writes: the plan in one line, the per-layer table, the
before/after summary table, the widths plot, and the compact cfg + weights written
together.
"""
import os
import tempfile

import torch
from terminaltables import AsciiTable

from darknet.cfg import write_cfg
from darknet.weights import darknet_float_count, save_weights
from deploy.onnx_export import onnx_runner
from pruning.criteria import get_criterion
from utils.errors import UserInputError
from utils.fileio import output_group
from utils.plots import pyplot, save_figure
from utils.torch_utils import count_macs, count_parameters, forward_runner, interleaved_ratio

LATENCY_GMACS = 5.0       # latency is timed by default up to this size at the run's size
LATENCY_BUDGET = 5.0      # seconds of timing per runtime, once the first rounds are done
LATENCY_TOLERANCE = 0.1   # a ratio is stable when its spread is within this share of it


def describe_plan(mode, plan, difference):
    """One line: how many of the prunable channels the plan cuts (a shortcut group's
    channel counts once, as --percent counts it), by what rule, and the self-check."""
    total = sum(max(len(plan.masks[i]) for i in unit) for unit in plan.units)
    kept = sum(int(torch.stack([_padded(plan.masks[i], unit, plan) for i in unit]).any(0).sum())
               for unit in plan.units)
    score = get_criterion(plan.criterion).label()
    rule = (f'widths from measured loss curves (sensitivity allocation), {score} within a '
            'unit' if plan.allocation == 'sensitivity' else f'at {score} <= {plan.threshold:.4g}')
    return (f'{mode} mode: {total - kept} of {total} prunable channels '
            f'({(total - kept) / total:.1%}) in {len(plan.units)} units cut {rule}; largest '
            f'safe percent {plan.safe_percent:.4f}; compact vs keep-size model: largest '
            f'difference {difference:.2e} of the output scale')


def _padded(mask, unit, plan):
    width = max(len(plan.masks[i]) for i in unit)
    return torch.cat((mask, mask.new_zeros(width - len(mask))))


def layer_table(model, plan):
    rows = [['layer', 'filters', 'kept', 'pruned', 'max |gamma|']]
    for unit in plan.units:
        for i in unit:
            mask = plan.masks[i]
            gamma = model.module_list[i].BatchNorm2d.weight.detach().abs().max()
            tied = f' (tied: {len(unit)})' if len(unit) > 1 else ''
            rows.append([f'{i}{tied}', len(mask), int(mask.sum()),
                         f'{1 - mask.float().mean():.1%}', f'{gamma:.4f}'])
    return AsciiTable(rows).table


def _ratio(after, before):
    return f'{after / before:.2f}x' if before else ''


def _latency_rows(latency):
    """The latency rows: each model's median ms and the interleaved ratio with its spread
    ('0.62x ± 0.04'), or 'not measured (--latency)' when the run skipped them."""
    labels = (('pytorch', 'PyTorch latency (ms, batch 1, BN fused)'),
              ('onnxruntime', 'ONNX Runtime latency (ms, batch 1)'))
    if latency is None:
        return [[labels[0][1], '-', '-', 'not measured (--latency)']]
    return [[label, f'{t.first * 1e3:.2f}', f'{t.second * 1e3:.2f}',
             f'{t.ratio:.2f}x ± {t.spread:.2f}']
            for key, label in labels if (t := latency.get(key)) is not None]


def summary_table(before, after, latency=None):
    """Original vs pruned. The last column is a difference for the mAP rows (marked
    '(difference)') and a ratio, pruned / original, for the others ('0.45x'); latency
    ratios carry their spread over the timing rounds. `latency`: compare_latency's
    result, or None when not measured."""
    rows = [['', 'original', 'pruned', 'pruned vs original']]
    maps = [('map50', 'mAP@0.5'), ('map50_95', 'mAP@0.5:0.95')]
    recalibrated = after.get('map50_as_cut') is not None
    if before['map50'] is not None:
        if recalibrated:
            rows.append(['mAP@0.5 as cut', f'{before["map50"]:.4f}',
                         f'{after["map50_as_cut"]:.4f}',
                         f'{after["map50_as_cut"] - before["map50"]:+.4f} (difference)'])
        for key, label in maps:
            if before.get(key) is None:
                continue
            rows.append([label + (', BN recalibrated' if recalibrated else ''),
                         f'{before[key]:.4f}', f'{after[key]:.4f}',
                         f'{after[key] - before[key]:+.4f} (difference)'])
    rows += [['parameters', f'{before["params"]:,}', f'{after["params"]:,}',
              _ratio(after['params'], before['params'])],
             ['GMACs', f'{before["macs"] / 1e9:.3f}', f'{after["macs"] / 1e9:.3f}',
              _ratio(after['macs'], before['macs'])]]
    rows += _latency_rows(latency)
    rows.append(['.weights file (MB)', f'{before["size"] / 1e6:.2f}', f'{after["size"] / 1e6:.2f}',
                 _ratio(after['size'], before['size'])])
    return AsciiTable(rows).table


def latency_warnings(latency):
    """One plain line per latency figure that cannot be trusted as a speed-up: the
    ratio's spread over the rounds above LATENCY_TOLERANCE (the machine was too busy to
    tell), or the pruned model measured slower than the original."""
    lines = []
    for key, name in (('pytorch', 'PyTorch'), ('onnxruntime', 'ONNX Runtime')):
        t = (latency or {}).get(key)
        if t is None:
            continue
        figure = f'{t.ratio:.2f}x ± {t.spread:.2f} over {t.rounds} rounds'
        if not t.stable:
            lines.append(f'warning: {name} latency {figure}: the ratio varied by more than '
                         f'{LATENCY_TOLERANCE:.0%} between rounds; the machine is too busy to '
                         'tell, measure again on an idle one')
        elif t.ratio > 1:
            lines.append(f'warning: {name} latency {figure}: the pruned model measured slower '
                         'than the original; the machine may be busy, or on this device the '
                         'cut does not pay in latency')
    return lines


def map_advice(before, after):
    """One line of advice when the pruned mAP@0.5 is less than half the original's."""
    if before.get('map50') is None or after.get('map50') is None or before['map50'] <= 0:
        return None
    if after['map50'] >= before['map50'] / 2:
        return None
    return (f'advice: mAP@0.5 fell from {before["map50"]:.4f} to {after["map50"]:.4f}, by more '
            'than half: fine-tune the pruned model (train.py --cfg <pruned .cfg> --weights '
            '<pruned .weights>), sparsity-train longer before pruning, or cut less')


def time_latency(flag, macs):
    """Whether to time latency: the --latency flag when given, else for models of at most
    LATENCY_GMACS at the run's size (larger ones take long to time on a CPU)."""
    return flag if flag is not None else macs <= LATENCY_GMACS * 1e9


def measure(model, img_size, score=None):
    """The summary's figures but latency (compare_latency): `score(model)` gives the
    evaluation's metrics dict ('map50', 'map50_95'), or the mAP@0.5 alone, or None (not
    measured). The size is that of the model's .weights file, so a .pt input (which may
    carry optimizer state) compares like for like."""
    maps = None if score is None else score(model)
    map50, map50_95 = ((maps['map50'], maps.get('map50_95')) if isinstance(maps, dict)
                       else (maps, None))
    return {'map50': map50, 'map50_95': map50_95, 'params': count_parameters(model),
            'macs': count_macs(model, img_size), 'size': 20 + 4 * darknet_float_count(model)}


def compare_latency(model, compact, img_size, budget=LATENCY_BUDGET):
    """{'pytorch': RatioTiming, 'onnxruntime': RatioTiming or None} of the compact model
    against the original, batch 1, each timed in interleaved rounds until the ratio is
    stable or `budget` seconds are spent (per runtime). ONNX Runtime is None without
    onnxruntime or when its temporary exports cannot be written."""
    timing = {'pytorch': interleaved_ratio(forward_runner(model, img_size),
                                           forward_runner(compact, img_size), budget=budget,
                                           tolerance=LATENCY_TOLERANCE)}
    with tempfile.TemporaryDirectory() as folder:
        try:
            runners = [onnx_runner(m, img_size, os.path.join(folder, f'{name}.onnx'))
                       for m, name in ((model, 'original'), (compact, 'pruned'))]
        except (UserInputError, OSError):
            # a full disk must stop the run at the outputs, not here
            runners = [None]
        timing['onnxruntime'] = None if None in runners else interleaved_ratio(
            *runners, budget=budget, tolerance=LATENCY_TOLERANCE)
    return timing


def write_outputs(compact, cfg_path, weights_path, *, img_size=None):
    """The cfg and weights, renamed into place together: a failed write, Ctrl-C or
    SIGTERM leaves neither (and any previous pair as it was). With `img_size` the cfg's
    [net] width and height are set to it, the size the run pruned and measured at, so
    that a .weights file (which records no size) still brings its size to the next
    script."""
    hyperparams = dict(compact.hyperparams)
    if img_size:
        hyperparams.update(width=img_size, height=img_size)
    with output_group():
        save_weights(compact, weights_path)
        write_cfg(cfg_path, hyperparams, compact.module_defs)


def plot_widths(model, plan, path, title):
    """Bars of each prunable conv's width before and after: a starved layer shows at once."""
    plt = pyplot()
    convs = [i for unit in plan.units for i in unit]
    convs.sort()
    widths = [len(plan.masks[i]) for i in convs]
    kept = [int(plan.masks[i].sum()) for i in convs]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.22 * len(convs) + 2), 4))
    x = range(len(convs))
    axis.bar(x, widths, color='#cccccc', label='original')
    axis.bar(x, kept, color='tab:blue', label='kept')
    axis.set_xticks(list(x), [str(i) for i in convs], rotation=90, fontsize=7)
    axis.set_yscale('log')
    axis.set_xlabel('conv layer (prunable)')
    axis.set_ylabel('channels')
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=90)
