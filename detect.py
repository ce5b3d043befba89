"""Detect objects in images or videos and draw them: any model, pruned or not.

    python detect.py --cfg cfg/yolov3-shapes.cfg --weights weights/yolov3-shapes.pt \
        --data data/shapes.data --source data/shapes/images/valid --save-txt

    python detect.py --cfg cfg/yolov3-shapes.cfg --weights weights/yolov3-shapes.pt \
        --compare runs/prune/m-shortcut-0.5.cfg runs/prune/m-shortcut-0.5.weights \
        --data data/shapes.data --source 'data/shapes/images/valid/00*.jpg'

--source takes an image, a folder, a glob, a .txt list of paths or a video file.
Annotated copies (same names) go to --output-dir, labels ('class cx cy w h') with
--save-txt to its labels/ folder. --compare runs a second model (the pruned one) on
each image and writes the two results side by side, each titled with its latency; its
labels go to labels-compare/. Both models run at one input size: --img-size, else the
size the first model's .pt was trained at, else its cfg's width.
With no arguments it runs the sparse demo YOLOv3 and a copy pruned in memory (shortcut
mode, 50%) side by side on a few demo validation images.
"""
import os

import cv2
import numpy as np
from tqdm import tqdm

from cli.common import ArgumentParser, add_data_args, add_model_args, choose_img_size, use_demo
from darknet.cfg import load_class_names, parse_data_cfg
from darknet.model import Darknet
from darknet.weights import load_weights
from data.datasets import check_img_size
from deploy.drawing import (Detector, draw, find_sources, is_video_file, label_lines, read_image,
                            side_by_side)
from deploy.inference import check_half, prepare
from utils.errors import UserInputError, run_cli
from utils.fileio import (atomic_output, atomic_write_text, overwritten_input, require_output_dir,
                          resolved_inputs)
from utils.torch_utils import select_device

DEMO_IMAGES = 4
LABEL_DIRS = ('labels', 'labels-compare')  # --save-txt: the first model's, the --compare one's


def load_model(cfg, weights, device):
    if not weights:
        raise UserInputError(f'--cfg {cfg} needs its --weights (.weights or .pt)')
    return load_weights(Darknet(cfg), weights).to(device).eval()


def demo_models(cfg, weights, device):
    """The sparse demo YOLOv3 and a copy pruned in memory at prune_shortcut.py's
    data-free default (no training images to score or recalibrate on)."""
    from pruning.selection import choose_plan
    from pruning.settings import PruneSettings
    from pruning.surgery import prune
    model = load_model(cfg, weights, device)
    plan = choose_plan(model, 'shortcut', PruneSettings(percent=0.5).resolve('shortcut'),
                       img_size=None)
    _, compact = prune(model, plan)
    return model, compact.to(device).eval()


def class_names(args, num_classes):
    """Names from --names or --data's names=, checked against the model's classes."""
    path = args.names
    if path is None and args.data:
        options = parse_data_cfg(args.data)
        path = options.get('names')
    if path is None:
        return None
    names = load_class_names(path)
    if len(names) != num_classes:
        raise UserInputError(f'{path}: {len(names)} class names but the model detects '
                             f'{num_classes} classes; pass the names file of this model')
    return names


def output_paths(sources, output_dir):
    """One output path per input, same file name (a repeated name gets _2, _3, ...);
    refuses any that would land on an input."""
    inputs = resolved_inputs(sources)
    outputs, used = [], set()
    for path in sources:
        stem, ext = os.path.splitext(os.path.basename(path))
        ext = '.mp4' if is_video_file(path) else ext
        name, n = stem + ext, 1
        while name in used:
            n += 1
            name = f'{stem}_{n}{ext}'
        used.add(name)
        out = os.path.join(output_dir, name)
        clash = overwritten_input(out, inputs)
        if clash:
            raise UserInputError(f'--output-dir {output_dir}: would overwrite the input {clash}; '
                                 'choose another --output-dir')
        outputs.append(out)
    return outputs


def annotate(detectors, frame, names):
    """(drawn frame, detections of each model): one model's drawing, or each model's
    side by side, titled with its latency."""
    results = [detector(frame) for detector in detectors]
    found = [result[0] for result in results]
    if len(detectors) == 1:
        return draw(frame, found[0], names), found
    panels = [draw(frame, boxes, names, f'{d.name}: {ms:.1f} ms')
              for d, (boxes, ms) in zip(detectors, results)]
    return side_by_side(*panels), found


def write_image(path, image):
    ok, encoded = cv2.imencode(os.path.splitext(path)[1] or '.jpg', image)
    if not ok:
        raise UserInputError(f'{path}: OpenCV cannot encode this image type; use .jpg or .png')
    with atomic_output(path) as f:
        f.write(encoded.tobytes())


def detect_video(path, out, detectors, names, bar):
    """Annotate every frame of a video into `out` (mp4); returns the frame count."""
    capture = cv2.VideoCapture(path)
    ok, frame = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        raise UserInputError(f'{path}: cannot read it as a video (OpenCV could not open or '
                             'decode it); pass a readable video file')
    fps = capture.get(cv2.CAP_PROP_FPS) or 25
    frames, writer = 0, None
    # VideoWriter writes by name and picks the container by the name's extension: it
    # fills a hidden .mp4 beside `out`, which goes into place through atomic_output once
    # complete (encoding outside it keeps Ctrl-C immediate)
    video = os.path.join(os.path.dirname(os.path.abspath(out)),
                         f'.{os.path.basename(out)}.tmp{os.getpid()}.mp4')
    try:
        while ok:
            drawn, _ = annotate(detectors, frame, names)
            if writer is None:
                writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), fps,
                                         (drawn.shape[1], drawn.shape[0]))
                if not writer.isOpened():
                    raise UserInputError(f'{out}: OpenCV cannot write an mp4 video here (no '
                                         'mp4v encoder); install opencv-python')
            writer.write(drawn)
            frames += 1
            bar.set_postfix(frame=frames, ms=f'{detectors[0].times[-1]:.1f}')
            ok, frame = capture.read()
        writer.release()
        with atomic_output(out) as f:
            os.replace(video, f.name)
    finally:
        capture.release()
        if os.path.exists(video):
            os.remove(video)
    return frames


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    add_model_args(parser, 'model definition (.cfg); default: the sparse demo YOLOv3, '
                   'compared with a copy pruned in memory')
    parser.add_argument('--source', help='image, folder, glob, .txt list or video file')
    parser.add_argument('--compare', nargs=2, metavar=('CFG', 'WEIGHTS'),
                        help='a second model (e.g. the pruned one), drawn beside the first')
    add_data_args(parser, 'data set description (.data) whose names= file gives the class '
                  'names', loader=False)
    parser.add_argument('--names', help='class names, one per line (.names); overrides --data')
    parser.add_argument('--conf-thres', type=float, default=0.25, help='score threshold')
    parser.add_argument('--iou-thres', '--nms-thres', dest='iou_thres', type=float,
                        default=0.45, help='NMS IoU threshold')
    parser.add_argument('--output-dir', '--output', dest='output_dir', default='runs/detect',
                        help='folder for the annotated images and videos')
    parser.add_argument('--save-txt', action='store_true',
                        help="also write Darknet labels ('class cx cy w h') to OUTPUT-DIR/labels "
                        '(and the --compare model\'s to OUTPUT-DIR/labels-compare)')
    parser.add_argument('--half', action='store_true',
                        help='fp16 inference (--device cuda only); on CUDA the models are fused '
                        'and replayed from CUDA graphs (deploy/inference.py)')
    return parser


def setup(args, device):
    """(detectors, names, sources) for the arguments; the demo when --cfg is absent."""
    if args.cfg is None:
        use_demo(args, weights='sparse_weights')
        first, second = demo_models(args.cfg, args.weights, device)
        titles = ('sparse demo YOLOv3', 'pruned 50% (shortcut)')
        if args.source is None:
            args.source = parse_data_cfg(args.data)['valid']  # a .txt list
            sources = find_sources(args.source)[:DEMO_IMAGES]
        else:
            sources = find_sources(args.source)
    else:
        if args.source is None:
            raise UserInputError('--source is required with --cfg: an image, folder, glob, '
                                 '.txt list or video file')
        sources = find_sources(args.source)
        first = load_model(args.cfg, args.weights, device)
        second = load_model(*args.compare, device) if args.compare else None
        titles = (os.path.basename(args.cfg), os.path.basename(args.compare[0])
                  if args.compare else '')
    names = class_names(args, first.num_classes)
    if second is not None and second.num_classes != first.num_classes:
        raise UserInputError(f'--compare {args.compare[0]}: detects {second.num_classes} '
                             f'classes, the first model {first.num_classes}; compare models '
                             'of one data set')
    img_size = choose_img_size(first, args.img_size, args.weights, args.cfg)
    if second is not None:
        check_img_size(img_size, second.stride)
    detectors = []
    for model, title in zip((first, second), titles):
        if model is None:
            continue
        # BatchNorm folded into the convs (Darknet.fuse); on a GPU also fp16 with --half and
        # CUDA-graph replay (deploy/inference.py)
        net = (prepare(model, device, half=args.half, graph=True) if device.type == 'cuda'
               else model.fuse())
        detectors.append(Detector(net, img_size, args.conf_thres, args.iou_thres, title))
    return detectors, names, sources


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = select_device(args.device)
    check_half(args.half, device)
    require_output_dir(args.output_dir)
    detectors, names, sources = setup(args, device)
    outputs = output_paths(sources, args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    label_dirs = [os.path.join(args.output_dir, name)
                  for name in LABEL_DIRS[:len(detectors)]] if args.save_txt else []
    for folder in label_dirs:
        os.makedirs(folder, exist_ok=True)
    bar = tqdm(list(zip(sources, outputs)), desc='detecting', unit='file')
    counts = {'images': 0, 'frames': 0, 'boxes': 0}
    for path, out in bar:
        if is_video_file(path):
            counts['frames'] += detect_video(path, out, detectors, names, bar)
            continue
        frame = read_image(path)
        drawn, found = annotate(detectors, frame, names)
        write_image(out, drawn)
        stem = os.path.splitext(os.path.basename(out))[0]
        for folder, boxes in zip(label_dirs, found):
            atomic_write_text(os.path.join(folder, stem + '.txt'), label_lines(boxes, frame.shape))
        counts['images'] += 1
        counts['boxes'] += len(found[0])
        bar.set_postfix(boxes=len(found[0]), ms=f'{detectors[0].times[-1]:.1f}')
    timing = ', '.join(f'{d.name or "model"} {np.median(d.times):.1f} ms' for d in detectors)
    print(f'{counts["images"]} image(s), {counts["frames"]} video frame(s), '
          f'{counts["boxes"]} box(es) in the images; median per image: {timing}; '
          f'wrote {args.output_dir}')
    return {'outputs': outputs, 'detectors': detectors, **counts}


if __name__ == '__main__':
    run_cli(main)
