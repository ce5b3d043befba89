"""What a prune run shows and writes: the plan in one line, the per-layer table, the
before/after summary table, the widths plot, and the compact cfg + weights written
together.
"""
from terminaltables import AsciiTable

from darknet.cfg import write_cfg
from darknet.weights import darknet_float_count, save_weights
from deploy.onnx_export import model_latency
from pruning.criteria import get_criterion
from utils.errors import UserInputError
from utils.fileio import output_group
from utils.plots import pyplot, save_figure
from utils.torch_utils import count_macs, count_parameters, fused_latency


def describe_plan(mode, plan, difference):
    cut = sum(int((~m).sum()) for m in plan.masks.values())
    total = sum(len(plan.masks[i]) for unit in plan.units for i in unit)
    score = get_criterion(plan.criterion).label()
    return (f'{mode} mode: {cut} of {total} prunable channels in {len(plan.units)} units cut '
            f'at {score} <= {plan.threshold:.4g}; largest safe percent {plan.safe_percent:.4f}; '
            f'compact vs keep-size model: largest difference {difference:.2e} of the output '
            'scale')


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


def summary_table(before, after):
    def ratio(key):
        return f'{after[key] / before[key]:.2f}x' if before[key] else ''
    rows = [['', 'original', 'pruned', 'pruned / original']]
    if before['map50'] is not None:
        if after.get('map50_as_cut') is not None:
            rows.append(['mAP@0.5 as cut', f'{before["map50"]:.4f}',
                         f'{after["map50_as_cut"]:.4f}',
                         f'{after["map50_as_cut"] - before["map50"]:+.4f}'])
        label = 'mAP@0.5, BN recalibrated' if after.get('map50_as_cut') is not None else 'mAP@0.5'
        rows.append([label, f'{before["map50"]:.4f}', f'{after["map50"]:.4f}',
                     f'{after["map50"] - before["map50"]:+.4f}'])
    rows += [['parameters', f'{before["params"]:,}', f'{after["params"]:,}', ratio('params')],
             ['GMACs', f'{before["macs"] / 1e9:.3f}', f'{after["macs"] / 1e9:.3f}', ratio('macs')],
             ['PyTorch latency (ms, batch 1, BN fused)', f'{before["latency"] * 1e3:.2f}',
              f'{after["latency"] * 1e3:.2f}', ratio('latency')]]
    if before.get('ort_latency') is not None:
        rows.append(['ONNX Runtime latency (ms, batch 1)', f'{before["ort_latency"] * 1e3:.2f}',
                     f'{after["ort_latency"] * 1e3:.2f}', ratio('ort_latency')])
    rows.append(['.weights file (MB)', f'{before["size"] / 1e6:.2f}', f'{after["size"] / 1e6:.2f}',
                 ratio('size')])
    return AsciiTable(rows).table


def _ort_latency(model, img_size):
    """ONNX Runtime's figure, or None without onnxruntime or when its temporary export
    cannot be written (a full disk must stop the run at the outputs, not here)."""
    try:
        return model_latency(model, img_size)
    except (UserInputError, OSError):
        return None


def measure(model, img_size, score=None):
    """The summary's figures; `score(model)` gives the mAP@0.5 (None: not measured). The
    size is that of the model's .weights file, so a .pt input (which may carry optimizer
    state) compares like for like."""
    return {'map50': None if score is None else score(model),
            'params': count_parameters(model), 'macs': count_macs(model, img_size),
            'latency': fused_latency(model, img_size), 'ort_latency': _ort_latency(model, img_size),
            'size': 20 + 4 * darknet_float_count(model)}


def write_outputs(compact, cfg_path, weights_path):
    """The cfg and weights, renamed into place together: a failed write, Ctrl-C or
    SIGTERM leaves neither (and any previous pair as it was)."""
    with output_group():
        save_weights(compact, weights_path)
        write_cfg(cfg_path, compact.hyperparams, compact.module_defs)


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
