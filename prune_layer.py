"""Layer pruning: remove the weakest residual blocks (depth), optionally channels too (width).

    python prune_layer.py --cfg CFG --weights SPARSE.pt --data DATA --layers 8 --percent 0.5

Blocks are ranked by the |gamma| of their branch convs (pruning/layer_prune.py says how);
--percent then prunes channels of the result in shortcut mode. With no arguments it
prunes the sparse demo YOLOv3 on the demo data.
"""
import time

from terminaltables import AsciiTable

from cli.common import ArgumentParser
from cli.prune import (add_common_args, close_run, fill_demo_defaults, load_model, map_scorer,
                       output_paths, refuse_difference)
from data.datasets import DataFile, check_classes
from pruning.layer_prune import layer_prune
from pruning.report import describe_plan, layer_table
from utils.errors import run_cli
from utils.fileio import require_output_dir


def get_args_parser():
    parser = add_common_args(ArgumentParser(
        description='Remove the weakest residual blocks of a sparsity-trained Darknet model '
                    '(and with --percent prune channels, shortcut mode, in the same run); '
                    'write the compact cfg + weights. With no arguments: the sparse demo '
                    'model.'))
    parser.add_argument('--layers', type=int,
                        help='number of residual blocks to remove, weakest first (default: '
                             'a quarter of the removable blocks, at least one)')
    parser.add_argument('--percent', type=float,
                        help='then cut this share of the prunable channels, by global '
                             '|gamma|, shortcut mode (default: no channel pruning)')
    parser.add_argument('--layer-keep', type=float,
                        help='with --percent: keep at least this share of every layer')
    parser.add_argument('--verbose', action='store_true',
                        help='print the per-block ranking (and per-layer table with --percent)')
    return parser


def describe_removal(result):
    scores = [b.score for b in result.removed]
    return (f'layer pruning: removed {len(result.removed)} of {len(result.ranking)} removable '
            f'residual blocks ({len(result.blocks)} [shortcut] blocks in all), '
            f'{sum(len(b.layers) for b in result.removed)} layers, scores '
            f'{min(scores):.4g} to {max(scores):.4g}; layer-pruned vs original with those '
            f'branches zeroed: largest difference {result.depth_difference:.2e} of the '
            'output scale')


def ranking_table(result):
    """Every [shortcut] block in layer order: its layers, score, rank and fate."""
    rank = {b.shortcut: r for r, b in enumerate(result.ranking, 1)}
    removed = {b.shortcut for b in result.removed}
    rows = [['block', 'layers', 'score', 'rank', 'removed?']]
    for b in result.blocks:
        fate = ('removed' if b.shortcut in removed else 'kept' if b.removable
                else f'kept: {b.obstacle}')
        rows.append([b.index, f'{b.source + 1}-{b.shortcut}',
                     '-' if b.score is None else f'{b.score:.4f}', rank.get(b.shortcut, '-'),
                     fate])
    return AsciiTable(rows).table


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    # the demo YOLOv3 (the tiny one has no blocks); its floor only matters with --percent
    fill_demo_defaults(args, channels=args.percent is not None)
    require_output_dir(args.output_dir)
    start = time.perf_counter()
    data = DataFile(args.data) if args.data else None
    model, img_size = load_model(args)
    if data is not None:
        check_classes(model, data.options, args.data, args.cfg)
    result = layer_prune(model, args.layers, args.percent, args.layer_keep,
                         min(img_size, 4 * model.stride))
    cfg_path, weights_path = output_paths(args, f'layer-{len(result.removed)}' + (
        '' if args.percent is None else f'-{args.percent:g}'))
    print(describe_removal(result))
    refuse_difference('the layer-pruned model and the original with its removed branches '
                      'zeroed', result.depth_difference)
    if result.plan is not None:
        print('then ' + describe_plan('shortcut', result.plan, result.difference))
        refuse_difference('the compact and keep-size models', result.difference)
    if args.verbose:
        print('residual blocks, by layer index in the input cfg:')
        print(ranking_table(result))
        if result.plan is not None:
            print('channels, by layer index in the layer-pruned cfg:')
            print(layer_table(result.depth_model, result.plan))
    report = close_run(model, result.compact, img_size, start, (cfg_path, weights_path),
                       map_scorer(data, args, img_size, model.stride), latency=args.latency)
    return {'result': result, 'ranking': result.ranking, 'removed': result.removed,
            'plan': result.plan, **report, 'depth_difference': result.depth_difference,
            'difference': result.difference}


if __name__ == '__main__':
    run_cli(main)
