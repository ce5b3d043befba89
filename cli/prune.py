"""What the prune scripts share: flags, the run, the checks and the summary.

The four channel scripts are `main(mode)`: flags -> `PruneSettings` (pruning/settings.py)
-> `pruning.plan.choose_plan` -> `pruning.surgery.prune` -> self-check -> `close_run`
(measure, recalibrate, write, print). The modes differ only in the masks the plan
computes. prune_layer.py has its own flags and run (pruning.layer_prune) and shares the
rest: the demo defaults, the model loading, the output names, the self-check refusal and
`close_run`.
"""
import argparse
import os
import time

from cli import demo
from cli.common import (ArgumentParser, add_data_args, add_exist_ok_arg, add_model_args,
                        add_output_dir_arg, choose_img_size, refuse_existing, require_weights,
                        use_demo)
from darknet.model import Darknet
from darknet.weights import load_weights
from data.datasets import DataFile, check_classes
from evaluation.evaluate import evaluate
from pruning.calibration import recalibrate_bn
from pruning.costs import COSTS
from pruning.criteria import CRITERIA
from pruning.report import (LATENCY_GMACS, compare_latency, describe_plan, latency_warnings,
                            layer_table, map_advice, measure, plot_widths, summary_table,
                            time_latency, write_outputs)
from pruning.selection import auto_table, choose_plan, describe_settings, split_images
from pruning.settings import (ALLOCATIONS, AUTO, CALIBRATION_IMAGES, DEFAULT_CRITERION,
                              DEFAULT_PERCENT, DEFAULT_ROUND_TO, FALLBACK_CRITERION, TARGETS,
                              PruneSettings)
from pruning.surgery import output_difference, prune
from utils.fileio import refuse_overwrite, require_output_dir
from utils.torch_utils import select_device

MAX_DIFFERENCE = 1e-3  # compact vs keep-size, as a share of the output scale


def add_common_args(parser):
    """The flags every prune script has: input, data, sizes, device, output folder,
    replacing an earlier run's files, latency."""
    add_model_args(parser, img_size_help='input side in pixels (default: the size a .pt was '
                   "trained at, else the cfg's width)")
    add_data_args(parser, 'data set description (.data) to measure mAP on',
                  batch_help='evaluation batch size')
    add_output_dir_arg(parser, 'runs/prune', 'folder for the pruned files')
    add_exist_ok_arg(parser, 'the pruned files')
    parser.add_argument('--latency', action=argparse.BooleanOptionalAction,
                        help='time the original and pruned models (batch 1, interleaved rounds) '
                             f'(default: on for models up to {LATENCY_GMACS:g} GMACs at the '
                             'run\'s size, off above)')
    return parser


def get_args_parser(mode):
    parser = add_common_args(ArgumentParser(
        description=f'Prune channels of a Darknet model, {mode} mode, and write the compact '
                    'cfg + weights. With no arguments: the sparse demo model.'))
    parser.add_argument('--percent', type=float,
                        help='share of the prunable channels to remove, lowest-ranked by '
                             '--criterion first (the same share under every criterion; '
                             f'--round-to may keep a few more) (default {DEFAULT_PERCENT:g})')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-params', type=float, metavar='F',
                        help='find the smallest percent that removes the share F of the '
                             'parameters (0.85: 85%%), instead of --percent')
    target.add_argument('--target-latency', type=float, metavar='F',
                        help='the same for the latency, as a table of each layer measured on '
                             '--device predicts it (ONNX Runtime on CPU; cached in '
                             'runs/latency-cache; docs/speed.md): 0.6 removes 60%%')
    target.add_argument('--target-gmacs', type=float, metavar='F',
                        help='the same for the multiply-accumulates (GMACs) at --img-size')
    add_selection_args(parser, mode)
    parser.add_argument('--verbose', action='store_true', help='print the per-layer table')
    return parser


def add_selection_args(parser, mode):
    """How channels are chosen: criterion, cost, per-layer limits, rounding, calibration."""
    parser.add_argument('--criterion', choices=[AUTO, *CRITERIA], default=DEFAULT_CRITERION,
                        help=f'channel importance (default {DEFAULT_CRITERION}: try every '
                             'criterion, with and without --cost, and the sensitivity '
                             'allocation, and keep the plan that scores best on held-out '
                             f'training images; without training images {FALLBACK_CRITERION}. '
                             'gamma: raw |gamma|, the original toolkit\'s rule; see '
                             'docs/pruning.md)')
    parser.add_argument('--allocate', choices=ALLOCATIONS, default='threshold',
                        help='how many channels each layer keeps: one global threshold over '
                             'the criterion\'s scores, or from each layer\'s measured loss '
                             'increase when cut (sensitivity; needs --data with a train= '
                             'list) (default threshold)')
    parser.add_argument('--cost', choices=(*COSTS, 'none'),
                        help='rank channels by importance per parameter, MAC or measured '
                             'second they save (default: params; macs with --target-gmacs, '
                             'latency with --target-latency; none with --criterion gamma)')
    floor = parser.add_mutually_exclusive_group()
    floor.add_argument('--max-layer-prune', type=float, metavar='F',
                       help='cut at most the share F of any layer (default 0.9; none with '
                            '--criterion gamma)')
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
    parser.add_argument('--allow-capped', action='store_true',
                        help='accept a --percent the per-layer floors cap (they keep some of '
                             'the channels it asks to cut) instead of stopping')
    parser.add_argument('--calibrate-variances', action='store_true',
                        help='re-estimate the running variances too')


def settings_from_args(args):
    """The PruneSettings the selection flags describe (not yet resolved)."""
    target = next(((kind, getattr(args, f'target_{kind}')) for kind in TARGETS
                   if getattr(args, f'target_{kind}', None) is not None), None)
    return PruneSettings(criterion=args.criterion, allocate=args.allocate, cost=args.cost,
                         max_layer_prune=args.max_layer_prune, layer_keep=args.layer_keep,
                         round_to=args.round_to, calibrate=args.calibrate,
                         calibrate_variances=args.calibrate_variances, percent=args.percent,
                         allow_capped=args.allow_capped,
                         target=target)


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
    """The input model in eval mode on --device, and the run's input size (--img-size,
    else the size a .pt was trained at, else the cfg's width; printed with its reason)."""
    model = load_weights(Darknet(args.cfg), args.weights).to(select_device(args.device)).eval()
    return model, choose_img_size(model, args.img_size, args.weights, args.cfg)


def map_scorer(data, args, img_size, stride):
    """model -> its metrics dict (mAP@0.5 'map50', mAP@0.5:0.95 'map50_95', ...) on the
    validation images (their loader built once), or None without data."""
    if data is None:
        return None
    loader = data.valid_loader(img_size, args.batch_size, stride, args.workers)
    return lambda model: evaluate(model, loader, data.classes, progress=False).metrics


def training_batches(data, settings, args, img_size, stride):
    """The training images the run reads (recalibration, a criterion on data), or None."""
    images = settings.training_images()
    if not images or data is None:
        return None
    return data.training_batches(images, img_size, args.batch_size, stride, args.workers)


def select_plan(model, mode, settings, img_size, batches):
    """(the plan, the calibration batches). With --criterion auto, the training images
    past the calibration ones score its candidates, and what it tried is printed."""
    started = time.perf_counter()
    if settings.criterion != AUTO:
        plan = choose_plan(model, mode, settings, img_size, batches)
        plan.settings = settings
        return plan, batches
    # a small training set: hold a third of it out rather than none
    images = sum(len(imgs) for imgs, _ in batches or ())
    calibration, held_out = split_images(batches, min(settings.calibrate, images - images // 3))
    plan = choose_plan(model, mode, settings, img_size, calibration, held_out=held_out)
    print(auto_table(plan, held_out))
    print(f'criterion auto: {describe_settings(plan.settings)} scored best of '
          f'{len(plan.candidates)} distinct plans ({time.perf_counter() - started:.1f} s)')
    return plan, calibration


def refuse_difference(what, difference):
    """Stop before writing anything when a self-check fails: that is a bug of ours."""
    if difference > MAX_DIFFERENCE:
        raise SystemExit(f'error: {what} differ by {difference:.2e} of the output scale '
                         f'(limit {MAX_DIFFERENCE:g}); nothing was written. This is a bug: '
                         'please report it with the cfg')


def output_paths(args, suffix):
    """<cfg stem>-<suffix>.cfg/.weights in --output-dir (the model and the run, e.g.
    yolov3-tiny-4-tiny-0.45.cfg), refused if one is an input or, without --exist-ok, the
    output of an earlier run."""
    stem = os.path.splitext(os.path.basename(args.cfg))[0]
    name = f'{stem}-{suffix}'
    paths = [os.path.join(args.output_dir, name + ext) for ext in ('.cfg', '.weights')]
    for path in paths:
        refuse_overwrite(path, (args.cfg, args.weights), 'choose another --output-dir')
    refuse_existing(paths, getattr(args, 'exist_ok', False), 'choose another --output-dir')
    return paths


def close_run(model, compact, img_size, start, paths, score=None, batches=None,
              settings=None, figures=None, latency=None):
    """The end every prune run shares, once its self-checks passed: measure the input;
    with `batches` (and recalibration on in `settings`) measure the compact model as cut
    and recalibrate its BatchNorm; write the cfg + weights `paths` together (the cfg's
    width and height: `img_size`), then each {path: draw} of `figures` as draw(path);
    measure the result; time both models when `latency` (--latency; None: for models up
    to LATENCY_GMACS); print the summary table, its warnings, advice when the mAP fell by
    more than half, and what was written, timed from `start`. `score` is map_scorer's,
    or None. Returns {'before', 'after', 'latency', 'cfg', 'weights'}."""
    seconds = time.perf_counter() - start
    figures = figures or {}
    before = measure(model, img_size, score)
    as_cut = None
    if batches and settings is not None and settings.calibrate:
        # the self-check ran before: this changes the model
        as_cut = measure(compact, img_size, score)['map50'] if score else None
        recalibrate_bn(compact, batches, settings.calibrate_variances)
    cfg_path, weights_path = paths
    write_outputs(compact, cfg_path, weights_path, img_size=img_size)
    for path, draw in figures.items():
        draw(path)
    after = {**measure(compact, img_size, score), 'map50_as_cut': as_cut}
    timing = (compare_latency(model, compact, img_size)
              if time_latency(latency, before['macs']) else None)
    print(summary_table(before, after, timing))
    for line in latency_warnings(timing) + [map_advice(before, after)]:
        if line:
            print(line)
    written = [cfg_path, weights_path, *figures]
    print(f'pruned in {seconds:.1f} s; wrote (at {img_size}x{img_size}, the size in the '
          'cfg)\n  ' + '\n  '.join(written))
    return {'before': before, 'after': after, 'latency': timing, 'cfg': cfg_path,
            'weights': weights_path}


def main(mode, argv=None):
    args = get_args_parser(mode).parse_args(argv)
    fill_demo_defaults(args, demo.TINY if mode == 'tiny' else demo.YOLOV3)
    require_output_dir(args.output_dir)
    start = time.perf_counter()
    data = DataFile(args.data) if args.data else None
    settings = settings_from_args(args).resolve(mode, data is not None and data.has_train)
    if args.criterion == AUTO and settings.criterion != AUTO:
        print(f'criterion auto: no training images to score candidates on (--data with a '
              f'train= list); using {describe_settings(settings)}')
    model, img_size = load_model(args)
    if data is not None:
        check_classes(model, data.options, args.data, args.cfg)
    batches = training_batches(data, settings, args, img_size, model.stride)
    plan, batches = select_plan(model, mode, settings, img_size, batches)
    if plan.removed is not None:
        kind, value = settings.target
        print(f'--target-{kind} {value:g}: --percent {plan.percent:.4f} removes '
              f'{plan.removed:.2%} of the {kind}'
              + (' (as the measured table predicts)' if kind == 'latency' else ''))
    cfg_path, weights_path = output_paths(args, f'{mode}-{plan.percent:g}')
    keep_size, compact = prune(model, plan)
    # the two models must agree on any input; a small one keeps the check quick
    difference = output_difference(keep_size, compact, min(img_size, 4 * model.stride))
    print(describe_plan(mode, plan, difference))
    refuse_difference('the compact and keep-size models', difference)
    if args.verbose:
        print(layer_table(model, plan))
    widths_path = os.path.splitext(cfg_path)[0] + '-widths.png'
    title = f'{os.path.basename(cfg_path)}: {describe_settings(plan.settings)}'
    score = map_scorer(data, args, img_size, model.stride)
    report = close_run(model, compact, img_size, start, (cfg_path, weights_path), score,
                       batches, settings,
                       {widths_path: lambda path: plot_widths(model, plan, path, title)},
                       latency=args.latency)
    return {'plan': plan, **report, 'widths': widths_path, 'difference': difference}
