"""What the four prune scripts share: flags, the run, the checks and the summary table.

Each script is `main(mode)` with its own flags added: the modes differ only in the
masks `utils.prune_utils.plan_masks` computes.
"""
import os
import time

from terminaltables import AsciiTable

from models import Darknet, darknet_float_count, load_weights, save_weights
from utils import demo
from utils.datasets import check_img_size
from utils.errors import ArgumentParser, UserInputError
from utils.parse_config import parse_data_cfg, require_data_key, write_cfg
from utils.prune_utils import find_percent, output_difference, plan_masks, prune
from utils.torch_utils import count_macs, count_parameters, measure_latency, select_device

MAX_DIFFERENCE = 1e-3  # compact vs keep-size, as a share of the output scale


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
    parser.add_argument('--layer-keep', type=float,
                        help='keep at least this share of every layer (allows any --percent)')
    if mode == 'regular':
        parser.add_argument('--round-to', type=int,
                            help='round kept widths up to multiples of N (default: powers of two)')
    parser.add_argument('--verbose', action='store_true', help='print the per-layer table')
    return parser


def fill_demo_defaults(args, mode):
    """No --cfg: the sparse demo model (tiny mode: the tiny one) on the demo data, with
    demo.LAYER_KEEP unless --layer-keep is given."""
    if args.cfg is None:
        model = demo.TINY if mode == 'tiny' else demo.YOLOV3
        args.cfg = model['cfg']
        args.weights = args.weights or demo.require_demo_weights(model['sparse_weights'])
        args.data = args.data or demo.ensure_demo_data()
        args.img_size = args.img_size or demo.IMG_SIZE
        if args.layer_keep is None and not (mode == 'layer' and args.percent is None):
            args.layer_keep = demo.LAYER_KEEP
    if args.weights is None:
        raise UserInputError('--weights is required with --cfg: pass the sparsity-trained '
                             '.weights or .pt')


def load_model(args):
    """The input model in eval mode on --device, and the checked input size."""
    model = load_weights(Darknet(args.cfg), args.weights).to(select_device(args.device)).eval()
    img_size = args.img_size or model.hyperparams.get('width') or 416
    check_img_size(img_size, model.stride)
    return model, img_size


def refuse_difference(what, difference):
    """Stop before writing anything when a self-check fails: that is a bug of ours."""
    if difference > MAX_DIFFERENCE:
        raise SystemExit(f'error: {what} differ by {difference:.2e} of the output scale '
                         f'(limit {MAX_DIFFERENCE:g}); nothing was written. This is a bug: '
                         'please report it with the cfg')


def describe_plan(mode, plan, difference):
    cut = sum(int((~m).sum()) for m in plan.masks.values())
    total = sum(len(plan.masks[i]) for unit in plan.units for i in unit)
    return (f'{mode} mode: {cut} of {total} prunable channels in {len(plan.units)} units cut '
            f'at |gamma| <= {plan.threshold:.4g}; largest safe percent {plan.safe_percent:.4f}; '
            f'compact vs keep-size model: largest difference {difference:.2e} of the output '
            'scale')


def output_paths(args, suffix):
    """<weights stem>-<suffix>.cfg/.weights in --output-dir, refused if one is an input."""
    stem = os.path.splitext(os.path.basename(args.weights or args.cfg))[0]
    name = f'{stem}-{suffix}'
    paths = [os.path.join(args.output_dir, name + ext) for ext in ('.cfg', '.weights')]
    inputs = {os.path.abspath(p) for p in (args.cfg, args.weights) if p}
    for path in paths:
        if os.path.abspath(path) in inputs:
            raise UserInputError(f'{path}: would overwrite an input file; choose another '
                                 '--output-dir')
    return paths


def _evaluate(model, args, img_size):
    if not args.data:
        return None
    from test import evaluate
    from utils.datasets import create_dataloader
    options = parse_data_cfg(args.data)
    if model.num_classes != options['classes']:
        raise UserInputError(f'{args.data}: classes={options["classes"]} but {args.cfg} detects '
                             f'{model.num_classes}; pass the matching .data')
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
        rows.append(['mAP@0.5', f'{before["map50"]:.4f}', f'{after["map50"]:.4f}',
                     f'{after["map50"] - before["map50"]:+.4f}'])
    rows += [['parameters', f'{before["params"]:,}', f'{after["params"]:,}', ratio('params')],
             ['GMACs', f'{before["macs"] / 1e9:.3f}', f'{after["macs"] / 1e9:.3f}', ratio('macs')],
             ['latency (ms, batch 1)', f'{before["latency"] * 1e3:.2f}',
              f'{after["latency"] * 1e3:.2f}', ratio('latency')],
             ['.weights file (MB)', f'{before["size"] / 1e6:.2f}', f'{after["size"] / 1e6:.2f}',
              ratio('size')]]
    return AsciiTable(rows).table


def measure(model, args, img_size):
    """The summary's figures; the size is that of the model's .weights file, so a .pt
    input (which may carry optimizer state) compares like for like."""
    return {'map50': _evaluate(model, args, img_size), 'params': count_parameters(model),
            'macs': count_macs(model, img_size), 'latency': measure_latency(model, img_size),
            'size': 20 + 4 * darknet_float_count(model)}


def write_outputs(compact, cfg_path, weights_path, folder):
    """The cfg and weights, each written atomically; neither is left without the other."""
    os.makedirs(folder, exist_ok=True)
    try:
        save_weights(compact, weights_path)
        write_cfg(cfg_path, compact.hyperparams, compact.module_defs)
    except BaseException:
        for path in (weights_path, cfg_path):
            if os.path.exists(path):
                os.remove(path)
        raise


def choose_plan(model, mode, args, img_size):
    """The plan for --percent, or for the percent that --target-params/--target-gmacs
    finds (then written into args.percent, which names the outputs)."""
    round_to = getattr(args, 'round_to', None)
    target, measure = ((args.target_params, 'params') if args.target_params is not None
                       else (args.target_gmacs, 'gmacs'))
    if target is None:
        args.percent = 0.5 if args.percent is None else args.percent
        return plan_masks(model, mode, args.percent, args.layer_keep, round_to)
    if args.percent is not None:
        raise UserInputError(f'--percent and --target-{measure}: pass one of them')
    args.percent, plan, share = find_percent(model, mode, target, measure, img_size,
                                             args.layer_keep, round_to)
    print(f'--target-{measure} {target:g}: --percent {args.percent:.4f} removes {share:.2%} '
          f'of the {measure}')
    return plan


def main(mode, argv=None):
    args = get_args_parser(mode).parse_args(argv)
    fill_demo_defaults(args, mode)
    start = time.perf_counter()
    model, img_size = load_model(args)
    plan = choose_plan(model, mode, args, img_size)
    cfg_path, weights_path = output_paths(args, f'{mode}-{args.percent:g}')
    keep_size, compact = prune(model, plan)
    # the two models must agree on any input; a small one keeps the check quick
    difference = output_difference(keep_size, compact, min(img_size, 4 * model.stride))
    print(describe_plan(mode, plan, difference))
    refuse_difference('the compact and keep-size models', difference)
    if args.verbose:
        print(layer_table(model, plan))
    seconds = time.perf_counter() - start
    before = measure(model, args, img_size)
    write_outputs(compact, cfg_path, weights_path, args.output_dir)
    after = measure(compact, args, img_size)
    print(summary_table(before, after))
    print(f'pruned in {seconds:.1f} s; wrote\n  {cfg_path}\n  {weights_path}')
    return {'plan': plan, 'before': before, 'after': after, 'cfg': cfg_path,
            'weights': weights_path, 'difference': difference}
