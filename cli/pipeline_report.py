"""pipeline.py's last stage: what other targets would cost, report.png and report.md.

The sweep prunes the kept sparse model (stage 2) at a few targets around the requested
one the way the sparsity monitor does (its data-free default plan, BN recalibrated on the
same training images, no fine-tuning), so the row at the requested target repeats the
monitor's figure for that checkpoint. report.png plots mAP@0.5 against parameters: the
sweep, the stage 3 model (the criterion auto chose, before fine-tuning), the final model
and the input. report.md tabulates every stage and links the stage 3 widths plot and the
monitor's curve.
"""
import json
import os

from cli.pipeline_stages import monitor_batches, pruned_at
from darknet.model import Darknet
from darknet.weights import load_weights
from utils.fileio import atomic_write_text
from utils.plots import pyplot, save_figure
from utils.torch_utils import select_device

SWEEP_STEPS = (-0.2, -0.1, 0.0, 0.1, 0.2)  # shares removed, added to the requested one
SWEEP_RANGE = (0.05, 0.95)


def sweep_targets(value):
    """The requested share and its neighbours (SWEEP_STEPS) within SWEEP_RANGE."""
    low, high = SWEEP_RANGE
    return sorted({round(value + step, 4) for step in SWEEP_STEPS
                   if low <= value + step <= high} | {value})


def sweep(ctx, done):
    """One row per sweep target: the share asked and pruned_at's figures of the kept
    sparse model there (the share removed and the mAP None where out of reach)."""
    args, (kind, value) = ctx.args, ctx.target
    model = load_weights(Darknet(args.cfg), done['2-sparsity']['weights'])
    model = model.to(select_device(args.device)).eval()
    batches = monitor_batches(ctx, model.stride)
    rows = []
    for share in sweep_targets(value):
        figures = pruned_at(ctx, model, share, batches) or {'removed': None, 'map50': None}
        rows.append({'target': share, **figures})
        if figures['map50'] is not None:
            print(f'sweep: --target-{kind} {share:g}: {figures["params"] / 1e6:.3f}M '
                  f'parameters, mAP@0.5 {figures["map50"]:.4f} (as cut, BN recalibrated)',
                  flush=True)
    return rows


def plot_report(path, ctx, done, rows):
    """mAP@0.5 against parameters (millions): the sweep and the stages' models."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    reached = [r for r in rows if r['map50'] is not None]
    axis.plot([r['params'] / 1e6 for r in reached], [r['map50'] for r in reached], 'o-',
              color='tab:blue', label='sparse model pruned, as cut (BN recalibrated)')
    for r in reached:
        axis.annotate(f'{r["target"]:g}', (r['params'] / 1e6, r['map50']), fontsize=7,
                      textcoords='offset points', xytext=(3, 3))
    pruned, final, start = done['3-prune'], done['5-final'], done['1-evaluate']
    points = ((start, 'input', 's', 'tab:gray'),
              (pruned['after'], f'stage 3, {pruned["criterion"]}, before fine-tuning', '^',
               'tab:orange'),
              (final, 'final (fine-tuned)', '*', 'tab:green'))
    for figures, label, marker, color in points:
        axis.plot([figures['params'] / 1e6], [figures['map50']], marker, color=color,
                  markersize=10, label=label)
    kind, value = ctx.target
    axis.set_xlabel('parameters (millions)')
    axis.set_ylabel('mAP@0.5')
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    axis.set_title(f'{os.path.basename(ctx.args.cfg)}, {ctx.mode} mode: --target-{kind} '
                   f'{value:g} and its neighbours', fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def _number(value, digits=4):
    return '-' if value is None else f'{value:.{digits}f}'


def _latency(done, which):
    timing = done['3-prune']['latency'].get('pytorch')
    return '-' if timing is None else f'{timing[which] * 1e3:.2f}'


def stage_rows(done):
    """The stage table's rows: stage, model, mAP@0.5, mAP@0.5:0.95, parameters, GMACs,
    latency (ms), seconds."""
    start, sparse, pruned = done['1-evaluate'], done['2-sparsity'], done['3-prune']
    tuned, final = done['4-finetune'], done['5-final']
    before, after = pruned['before'], pruned['after']
    stop = ('not needed: the input had caught up' if sparse['epochs'] == 0 else
            'stopped early: pruned mAP caught up' if sparse['stopped_early'] else
            'caught up at the last epoch' if sparse['caught_up'] else 'did not catch up')
    monitor = ('' if sparse['pruned_map50'] is None else
               f'; pruned at the target by the monitor: {sparse["pruned_map50"]:.4f}')
    rows = [
        ('1 evaluate', 'input', start, _latency(done, 'original'), start['seconds']),
        ('2 sparsity', f'{os.path.basename(sparse["weights"])}, epoch {sparse["epoch"]} of '
         f'{sparse["epochs"]} run ({stop}{monitor})', before, _latency(done, 'original'), sparse['seconds']),
        ('3 prune', f'{pruned["criterion"]}, as cut',
         {**after, 'map50': after['map50_as_cut'], 'map50_95': None}, '', None),
        ('3 prune', 'BN recalibrated', after, _latency(done, 'pruned'), pruned['seconds']),
        ('4 fine-tune', f'best.pt, epoch {tuned["epoch"]} of {tuned["epochs"]}',
         {**after, 'map50': tuned['map50'], 'map50_95': None}, _latency(done, 'pruned'),
         tuned['seconds']),
        ('5 final', 'final.cfg + final.weights', final, _latency(done, 'pruned'),
         final['seconds'])]
    return [[stage, model, _number(f['map50']), _number(f.get('map50_95')),
             f'{f["params"]:,}', f'{f["macs"] / 1e9:.3f}', latency,
             '' if seconds is None else f'{seconds:.0f}']
            for stage, model, f, latency, seconds in rows]


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def sweep_table(rows, kind):
    body = [[f'{r["target"]:g}', '-', '-', '-', 'out of reach'] if r['map50'] is None else
            [f'{r["target"]:g}', f'{r["removed"]:.1%}', f'{r["params"]:,}',
             f'{r["macs"] / 1e9:.3f}', f'{r["map50"]:.4f}'] for r in rows]
    return markdown_table([f'--target-{kind}', f'{kind} removed', 'parameters', 'GMACs',
                           'mAP@0.5 (as cut, BN recalibrated)'], body)


def monitor_section(sparse):
    if sparse['epochs'] == 0:
        return (f'No sparsity training: the input pruned at the target already scored '
                f'{sparse["pruned_map50"]:.4f} against {sparse["map50"]:.4f} unpruned.')
    return '![monitor](2-sparsity/pruned_map.png)'


def report_text(ctx, done, rows, record):
    """report.md: the command, the inputs, the stage table, the plots and the sweep."""
    args, (kind, value) = ctx.args, ctx.target
    final, pruned = done['5-final'], done['3-prune']
    here = lambda path: os.path.relpath(path, ctx.folder)
    latency = ('PyTorch, batch 1, BN fused, timed in stage 3 on the input\'s architecture '
               'and the pruned one' if pruned['latency'] else 'not measured (--latency)')
    parts = [
        f'# Pipeline report: {os.path.basename(args.cfg)}', '',
        f'`python {record}`', '',
        f'- input: `{args.cfg}` + `{args.weights}`; data `{args.data}`',
        f'- {ctx.mode} mode, --target-{kind} {value:g}; image size {ctx.img_size} in every '
        f'stage; device {args.device}',
        f'- final files: `final.cfg`, `final.weights`, `final.onnx` (onnxruntime agrees with '
        f'PyTorch within {final["onnx_difference"]:.1e} of the output scale)', '',
        '## Stages', '',
        markdown_table(['stage', 'model', 'mAP@0.5', 'mAP@0.5:0.95', 'parameters', 'GMACs',
                        'latency (ms)', 'time (s)'], stage_rows(done)), '',
        f'Latency: {latency}. Time: the wall time of the attempt that finished each stage. '
        'The final mAP is measured on the written files; test.py gives the same figure:', '',
        f'    python test.py --cfg {final["files"][0]} --weights {final["files"][1]} '
        f'--data {args.data} --img-size {ctx.img_size} '
        f'--batch-size {args.batch_size}', '',
        f'## Widths (stage 3, {pruned["criterion"]})', '',
        f'![widths]({here(pruned["widths"])})', '',
        '## Sparsity training: the monitor', '',
        monitor_section(done['2-sparsity']), '',
        '## Smaller or larger models', '',
        'Each pruned from the same sparse model with the monitor\'s data-free plan, BN '
        'recalibrated, not fine-tuned:', '',
        '![mAP against parameters](report.png)', '',
        sweep_table(rows, kind), '']
    return '\n'.join(parts)


def write_report(ctx, done):
    """Stage 6: sweep, report.png, then report.md; returns the sweep's rows."""
    rows = sweep(ctx, done)
    plot_report(ctx.path('report.png'), ctx, done, rows)
    with open(ctx.path('args.json'), encoding='utf-8') as f:
        command = json.load(f)['argv']
    atomic_write_text(ctx.path('report.md'), report_text(ctx, done, rows, command))
    print(f'wrote {ctx.path("report.md")}, {ctx.path("report.png")}')
    return {'sweep': rows, 'report': ctx.path('report.md')}
