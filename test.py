"""Evaluate a detector: precision, recall, mAP@0.5, mAP@0.5:0.95 and F1, per class.

    python test.py --cfg cfg/yolov3-shapes.cfg --weights weights/yolov3-shapes.pt \
        --data data/shapes.data --img-size 128

    python test.py --weights runs/export/yolov3-shapes.onnx --data data/shapes.data

An exported .onnx file (export.py) is evaluated with onnxruntime, no cfg needed, through
the same letterbox, NMS and metrics. With no arguments it evaluates the demo model on
the demo data. The evaluation itself is `evaluation.evaluate.evaluate`, which train.py
and the prune scripts call too. mAP@0.5:0.95 is the mean AP over IoU 0.50, 0.55, ...,
0.95 (COCO's thresholds and greedy matching, in original image pixels); each AP is the
area under the precision envelope, within about 0.01 of pycocotools' 101-point figure on
the --save-json rows (tests/test_train.py compares the two).
"""
import json
import os

from cli.common import (ArgumentParser, add_data_args, add_model_args, choose_img_size,
                        require_weights, use_demo)
from darknet.cfg import load_class_names, parse_data_cfg, require_data_key
from data.datasets import check_classes, create_dataloader
from deploy.inference import check_half, prepare
from deploy.onnx_export import load_model_or_onnx
from evaluation.evaluate import evaluate
from utils.errors import UserInputError, run_cli
from utils.fileio import atomic_write_text, refuse_overwrite, require_output_file
from utils.torch_utils import select_device


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    add_model_args(parser, 'model definition (.cfg); default: the demo model',
                   'model weights (.weights or .pt), or an exported .onnx file (then no --cfg)')
    add_data_args(parser, 'data set description (.data); default: the demo set')
    parser.add_argument('--conf-thres', type=float, default=0.001, help='score threshold')
    # the seed's test.py had --nms-thres for NMS and --iou-thres for matching a detection
    # to a label; matching here is fixed at IoU 0.5 (mAP@0.5) and 0.5:0.95
    parser.add_argument('--iou-thres', '--nms-thres', dest='iou_thres', type=float, default=0.5,
                        help='NMS IoU threshold (--nms-thres is the same flag; unlike the '
                        "ultralytics-era test.py, --iou-thres is not the matching threshold)")
    parser.add_argument('--save-json', metavar='PATH', nargs='?', const='results.json',
                        help='write COCO-format detections (.json; with no PATH: '
                        'results.json). Class ids stay 0-based, not COCO\'s 91-id numbering')
    parser.add_argument('--metrics-json', metavar='PATH', help='write the overall metrics (.json)')
    parser.add_argument('--half', action='store_true',
                        help='fp16 inference (--device cuda only); on CUDA the model is fused '
                        'and replayed from CUDA graphs (deploy/inference.py)')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    exported = bool(args.weights) and args.weights.endswith('.onnx')
    if exported and args.data is None:
        raise UserInputError(f'--data is required with --weights {args.weights}: pass the '
                             '.data file to evaluate the ONNX file on')
    if args.cfg is None and not exported:
        use_demo(args)
    if args.data is None:
        raise UserInputError('--data is required with --cfg: pass the .data file to evaluate on')
    require_weights(args)
    for flag, path in (('--save-json', args.save_json), ('--metrics-json', args.metrics_json)):
        if path:
            refuse_overwrite(path, (args.cfg, args.weights, args.data), 'choose another name',
                             flag)
            require_output_file(path, flag)
    device = select_device(args.device)
    check_half(args.half, device, exported)
    options = parse_data_cfg(args.data)
    model = load_model_or_onnx(args.cfg, args.weights, device)
    check_classes(model, options, args.data, args.cfg or args.weights,
                  'pass the matching .data or cfg')
    if exported and args.img_size not in (None, model.img_size):
        raise UserInputError(f'--img-size {args.img_size}: {args.weights} was exported for '
                             f'{model.img_size}x{model.img_size} inputs; drop --img-size or '
                             'export again with it')
    if exported:
        img_size = model.img_size
        print(f'image size {img_size} (fixed in {os.path.basename(args.weights)} at export)')
    else:
        img_size = choose_img_size(model, args.img_size, args.weights, args.cfg)
    # an exported graph has one fixed square input: its images are letterboxed to it,
    # where a Darknet model gets rectangular batches
    loader, _ = create_dataloader(require_data_key(options, 'valid', args.data), img_size,
                                  args.batch_size, options['classes'], rect=not exported,
                                  workers=args.workers, stride=model.stride)
    names = load_class_names(options['names']) if 'names' in options else None
    # on a GPU: fused, fp16 with --half, CUDA-graph replay (the CPU keeps evaluate's fused run)
    net = (prepare(model, device, half=args.half, graph=True)
           if device.type == 'cuda' and not exported else model)
    result = evaluate(net, loader, options['classes'], args.conf_thres, args.iou_thres,
                      collect_json=bool(args.save_json))
    print(result.table(names))
    if net is not model:
        print(net.describe())
    print(f'{result.images} images; time: ' + ', '.join(
        f'{k} {v:.2f} s' for k, v in result.seconds.items()))
    if args.save_json:
        atomic_write_text(args.save_json, json.dumps(result.detections))
        print(f'detections: {args.save_json}')
    if args.metrics_json:
        atomic_write_text(args.metrics_json, json.dumps(result.metrics, indent=1))
        print(f'metrics: {args.metrics_json}')
    return result


if __name__ == '__main__':
    run_cli(main)
