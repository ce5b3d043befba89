"""What the prune scripts share: flags, the run, the checks and the summary table.

The four channel scripts are `main(mode)` with its own flags added: the modes differ
only in the masks `utils.prune_utils.plan_masks` computes. prune_layer.py has its own
flags and run (utils.layer_prune) and shares the rest: the demo defaults, the model
loading, the output names, the self-check refusal and `finish`, the measure, write and
print tail.
"""
import os
import time

from terminaltables import AsciiTable

from models import Darknet, darknet_float_count, load_weights, save_weights
from utils import demo
from utils.cli import check_classes, default_img_size, require_weights, use_demo
from utils.errors import ArgumentParser, UserInputError
from utils.evaluate import evaluate
from utils.fileio import output_group, refuse_overwrite, require_output_dir
from utils.importance import CRITERIA, DATA_CRITERIA
from utils.onnx_utils import model_latency
from utils.parse_config import parse_data_cfg, require_data_key, write_cfg
from utils.plots import pyplot, save_figure
from utils.prune_utils import (find_percent, output_difference, plan_masks, prune,
                               rank_channels, recalibrate_bn)
from utils.torch_utils import count_macs, count_parameters, fused_latency, select_device

MAX_DIFFERENCE = 1e-3  # compact vs keep-size, as a share of the output scale
DEFAULT_CRITERION = 'consumer'  # chosen by benchmarks/criteria.py
# The share of a unit's channels the default criterion may cut (--max-layer-prune)
DEFAULT_MAX_LAYER_PRUNE = 0.9
DEFAULT_COST = 'params'
CALIBRATION_IMAGES = 128  # --calibrate default, when --data has a train= list
# Kept widths rounded up to multiples of 8 (regular mode: powers of two): measured the
# fastest or near it in PyTorch and ONNX Runtime for every mode (benchmarks/speed.py)
DEFAULT_ROUND_TO = 8


def add_common_args(parser):
    """The flags every prune script has: input, data, sizes, device, output folder."""
    parser.add_argument('--cfg', help='model definition (.cfg)')
    parser.add_argument('--weights', help='model weights (.weights or .pt)')
    parser.add_argument('--data', help='data set description (.data) to measure mAP on')
    parser.add_argument('--img-size', type=int, help="input side (default: the cfg's width)")
    parser.add_argument('--batch-size', type=int, default=16, help='evaluation batch size')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--workers', type=int, default=2, help='data loading processes')
    parser.add_argument('--output-dir', default='runs/prune', help='folder for the pruned files')
    return parser


def get_args_parser(mode):
    parser = add_common_args(ArgumentParser(
        description=f'Prune channels of a Darknet model, {mode} mode, and write the compact '
                    'cfg + weights. With no arguments: the sparse demo model.'))
    parser.add_argument('--percent', type=float,
                        help='share of the prunable channels to cut, by global |gamma| '
                             '(default 0.5)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-params', type=float, metavar='F',
                        help='find the smallest percent that removes the share F of the '
                             'parameters (0.85: 85%%), instead of --percent')
    target.add_argument('--target-gmacs', type=float, metavar='F',
                        help='the same for the multiply-accumulates (GMACs) at --img-size')
    add_selection_args(parser, mode)
    parser.add_argument('--verbose', action='store_true', help='print the per-layer table')
    return parser


def add_selection_args(parser, mode):
    """How channels are chosen: criterion, cost, per-layer limits, rounding, calibration."""
    parser.add_argument('--criterion', choices=CRITERIA, default=DEFAULT_CRITERION,
                        help=f'channel importance (default {DEFAULT_CRITERION}; gamma: raw '
                             '|gamma|, the original toolkit\'s rule; see docs/pruning.md)')
    parser.add_argument('--cost', choices=('params', 'macs', 'none'),
                        help='rank channels by importance per parameter or MAC they save '
                             f'(default: {DEFAULT_COST}, macs with --target-gmacs; none '
                             'with --criterion gamma)')
    floor = parser.add_mutually_exclusive_group()
    floor.add_argument('--max-layer-prune', type=float, metavar='F',
                       help='cut at most the share F of any layer (default '
                            f'{DEFAULT_MAX_LAYER_PRUNE:g}; none with --criterion gamma)')
    floor.add_argument('--layer-keep', type=float, metavar='F',
                       help='keep at least the share F of every layer: the same floor as '
                            '--max-layer-prune 1-F (allows any --percent)')
    parser.add_argument('--round-to', type=int, metavar='N',
                        help='round kept widths up to multiples of N; 1: no rounding '
                             '(default: ' + ('powers of two)' if mode == 'regular'
                                             else f'{DEFAULT_ROUND_TO})'))
    parser.add_argument('--calibrate', type=int, metavar='N',
                        help='re-estimate the BatchNorm running means of the pruned model on N '
                             f'training images (default {CALIBRATION_IMAGES} when --data '
                             'has a train= list; 0: off)')
    parser.add_argument('--calibrate-variances', action='store_true',
                        help='re-estimate the running variances too')


def resolve_selection(args, mode):
    """Fill the selection defaults that depend on the mode, the criterion and the target;
    refuse values out of range. Sets args.layer_keep (the floor), args.cost, args.round_to."""
    if args.round_to is None and mode != 'regular':
        args.round_to = DEFAULT_ROUND_TO
    if args.max_layer_prune is not None:
        if not 0 < args.max_layer_prune <= 1:
            raise UserInputError(f'--max-layer-prune {args.max_layer_prune}: must be in (0, 1], '
                                 'the largest share of a layer to cut')
        args.layer_keep = 1 - args.max_layer_prune if args.max_layer_prune < 1 else None
    elif args.layer_keep is None and args.criterion != 'gamma':
        args.layer_keep = 1 - DEFAULT_MAX_LAYER_PRUNE
    if args.cost is None:
        args.cost = ('none' if args.criterion == 'gamma' else
                     'macs' if getattr(args, 'target_gmacs', None) is not None else DEFAULT_COST)
    if args.calibrate is not None and args.calibrate < 0:
        raise UserInputError(f'--calibrate {args.calibrate}: a number of images, 0 for none')
    if args.calibrate and not args.data:
        raise UserInputError(f'--calibrate {args.calibrate}: needs --data with a train= list '
                             'to take the images from')


def calibration_batches(data, img_size, images, batch_size, stride, workers=0, seed=0):
    """`images` training images of the .data file `data` as a list of (images, targets)
    batches, letterboxed without augmentation, in a fixed shuffled order (a train list
    is often sorted by class or scene)."""
    from utils.datasets import create_dataloader
    options = parse_data_cfg(data)
    loader, _ = create_dataloader(require_data_key(options, 'train', data), img_size,
                                  batch_size, options['classes'], workers=workers,
                                  stride=stride, shards=(0, 1, seed))
    batches, count = [], 0
    for imgs, targets, _, _ in loader:
        take = min(len(imgs), images - count)
        batches.append((imgs[:take], targets[targets[:, 0] < take]))
        count += take
        if count >= images:
            break
    return batches


def fill_demo_defaults(args, model=demo.YOLOV3, channels=True):
    """No --cfg: the sparse demo `model` on the demo data; when the run prunes
    `channels` by raw |gamma| (--criterion gamma, or no --criterion flag) and no floor is
    given, demo.LAYER_KEEP. With --cfg, --weights is required."""
    if args.cfg is None:
        use_demo(args, model, 'sparse_weights')
        floor_given = args.layer_keep is not None or getattr(args, 'max_layer_prune', None)
        if channels and not floor_given and getattr(args, 'criterion', 'gamma') == 'gamma':
            args.layer_keep = demo.LAYER_KEEP
    require_weights(args, 'sparsity-trained')


def load_model(args):
    """The input model in eval mode on --device, and the checked input size."""
    model = load_weights(Darknet(args.cfg), args.weights).to(select_device(args.device)).eval()
    return model, default_img_size(model, args.img_size)


def refuse_difference(what, difference):
    """Stop before writing anything when a self-check fails: that is a bug of ours."""
    if difference > MAX_DIFFERENCE:
        raise SystemExit(f'error: {what} differ by {difference:.2e} of the output scale '
                         f'(limit {MAX_DIFFERENCE:g}); nothing was written. This is a bug: '
                         'please report it with the cfg')


def describe_plan(mode, plan, difference):
    cut = sum(int((~m).sum()) for m in plan.masks.values())
    total = sum(len(plan.masks[i]) for unit in plan.units for i in unit)
    score = '|gamma|' if plan.criterion == 'gamma' else f'{plan.criterion} score'
    return (f'{mode} mode: {cut} of {total} prunable channels in {len(plan.units)} units cut '
            f'at {score} <= {plan.threshold:.4g}; largest safe percent {plan.safe_percent:.4f}; '
            f'compact vs keep-size model: largest difference {difference:.2e} of the output '
            'scale')


def output_paths(args, suffix):
    """<weights stem>-<suffix>.cfg/.weights in --output-dir, refused if one is an input."""
    stem = os.path.splitext(os.path.basename(args.weights or args.cfg))[0]
    name = f'{stem}-{suffix}'
    paths = [os.path.join(args.output_dir, name + ext) for ext in ('.cfg', '.weights')]
    for path in paths:
        refuse_overwrite(path, (args.cfg, args.weights), 'choose another --output-dir')
    return paths


def _evaluate(model, args, img_size):
    if not args.data:
        return None
    from utils.datasets import create_dataloader
    options = parse_data_cfg(args.data)
    check_classes(model, options, args.data, args.cfg)
    loader, _ = create_dataloader(require_data_key(options, 'valid', args.data), img_size,
                                  args.batch_size, options['classes'], rect=True,
                                  workers=args.workers, stride=model.stride)
    return evaluate(model, loader, options['classes'], progress=False).metrics['map50']


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


def measure(model, args, img_size):
    """The summary's figures; the size is that of the model's .weights file, so a .pt
    input (which may carry optimizer state) compares like for like."""
    return {'map50': _evaluate(model, args, img_size), 'params': count_parameters(model),
            'macs': count_macs(model, img_size), 'latency': fused_latency(model, img_size),
            'ort_latency': _ort_latency(model, img_size),
            'size': 20 + 4 * darknet_float_count(model)}


def write_outputs(compact, cfg_path, weights_path, folder):
    """The cfg and weights, renamed into place together: a failed write, Ctrl-C or
    SIGTERM leaves neither (and any previous pair as it was)."""
    with output_group():
        save_weights(compact, weights_path)
        write_cfg(cfg_path, compact.hyperparams, compact.module_defs)


def selection_batches(args, model, img_size):
    """The training images a run needs: for --calibrate (by default CALIBRATION_IMAGES
    when --data has a train= list) and for a data criterion; None when it needs none."""
    has_train = bool(args.data) and 'train' in parse_data_cfg(args.data)
    if args.calibrate is None:
        args.calibrate = CALIBRATION_IMAGES if has_train else 0
    images = args.calibrate or (CALIBRATION_IMAGES if args.criterion in DATA_CRITERIA else 0)
    if not images or not args.data:
        return None
    return calibration_batches(args.data, img_size, images, args.batch_size, model.stride,
                               args.workers)


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


def choose_plan(model, mode, args, img_size, batches=None, start=None):
    """The plan for --percent, or for the percent that --target-params/--target-gmacs
    finds (then written into args.percent, which names the outputs), searched from the
    percent `start` when given. `batches` feed a data criterion."""
    cost = None if args.cost == 'none' else args.cost
    ranking = rank_channels(model, mode, args.criterion, cost, img_size, batches)
    target, measure = ((args.target_params, 'params') if args.target_params is not None
                       else (args.target_gmacs, 'gmacs'))
    if target is None:
        args.percent = 0.5 if args.percent is None else args.percent
        return plan_masks(model, mode, args.percent, args.layer_keep, args.round_to,
                          ranking=ranking)
    if args.percent is not None:
        raise UserInputError(f'--percent and --target-{measure}: pass one of them')
    args.percent, plan, share = find_percent(model, mode, target, measure, img_size,
                                             args.layer_keep, args.round_to, ranking=ranking,
                                             start=start)
    print(f'--target-{measure} {target:g}: --percent {args.percent:.4f} removes {share:.2%} '
          f'of the {measure}')
    return plan


def default_plan(model, mode, percent):
    """The plan a prune script makes with its default flags at `percent` (without
    --data: no data criterion): what detect.py's demo shows."""
    args = get_args_parser(mode).parse_args(['--percent', str(percent)])
    resolve_selection(args, mode)
    return choose_plan(model, mode, args, img_size=None)


def finish(model, compact, args, img_size, start, paths, batches=None, figures=None):
    """The end every prune run shares, once its self-checks passed: measure the input;
    with `batches` (and --calibrate not 0) measure the compact model as cut and
    recalibrate its BatchNorm; write the cfg + weights `paths` together, then each
    {path: draw} of `figures` as draw(path); measure the result; print the summary table
    and what was written, timed from `start`. Returns {'before', 'after', 'cfg', 'weights'}."""
    seconds = time.perf_counter() - start
    figures = figures or {}
    before = measure(model, args, img_size)
    as_cut = None
    if batches and args.calibrate != 0:  # the self-check ran before: this changes the model
        as_cut = _evaluate(compact, args, img_size)
        recalibrate_bn(compact, batches, args.calibrate_variances)
    cfg_path, weights_path = paths
    write_outputs(compact, cfg_path, weights_path, args.output_dir)
    for path, draw in figures.items():
        draw(path)
    after = {**measure(compact, args, img_size), 'map50_as_cut': as_cut}
    print(summary_table(before, after))
    written = [cfg_path, weights_path, *figures]
    print(f'pruned in {seconds:.1f} s; wrote\n  ' + '\n  '.join(written))
    return {'before': before, 'after': after, 'cfg': cfg_path, 'weights': weights_path}


def main(mode, argv=None):
    args = get_args_parser(mode).parse_args(argv)
    fill_demo_defaults(args, demo.TINY if mode == 'tiny' else demo.YOLOV3)
    require_output_dir(args.output_dir)
    start = time.perf_counter()
    resolve_selection(args, mode)
    model, img_size = load_model(args)
    batches = selection_batches(args, model, img_size)
    plan = choose_plan(model, mode, args, img_size, batches)
    cfg_path, weights_path = output_paths(args, f'{mode}-{args.percent:g}')
    keep_size, compact = prune(model, plan)
    # the two models must agree on any input; a small one keeps the check quick
    difference = output_difference(keep_size, compact, min(img_size, 4 * model.stride))
    print(describe_plan(mode, plan, difference))
    refuse_difference('the compact and keep-size models', difference)
    if args.verbose:
        print(layer_table(model, plan))
    widths_path = os.path.splitext(cfg_path)[0] + '-widths.png'
    title = f'{os.path.basename(cfg_path)}: {args.criterion}'
    report = finish(model, compact, args, img_size, start, (cfg_path, weights_path), batches,
                    {widths_path: lambda path: plot_widths(model, plan, path, title)})
    return {'plan': plan, **report, 'widths': widths_path, 'difference': difference}
