"""Where evaluation and training time goes, on the demo data.

    python benchmarks/eval_train_speed.py [--cfg cfg/yolov3-shapes.cfg] [--weights W]

Evaluation: model forward against NMS + matching + metrics, as shares of the whole
(target: NMS plus metrics under 20%). Training: images/s of train.py's own loop
(data loading, augmentation, loss, optimizer) next to a bare forward + backward +
step loop of the same model on one cached batch, so the data loading overhead shows.
Both in one run, so the ratios hold on a noisy machine. Without --weights the model is
random, which makes NMS look worse than it is: random heads pass many boxes.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import demo  # noqa: E402
from darknet.cfg import parse_data_cfg  # noqa: E402
from darknet.loss import compute_loss  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_weights  # noqa: E402
from data.datasets import create_dataloader  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from training.engine import make_optimizer  # noqa: E402


def training_throughput(model, loader, batches):
    """Images/s of the real loop over `loader` and of a bare loop on one batch."""
    optimizer = make_optimizer(model, 0.001, 0.9, 5e-4)
    model.train()

    def step(imgs, targets):
        loss, _ = compute_loss(model(imgs), targets, model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seen, start = 0, time.perf_counter()
    for i, (imgs, targets, _, _) in enumerate(loader):
        if i == batches:
            break
        step(imgs, targets)
        seen += len(imgs)
    real = seen / (time.perf_counter() - start)
    imgs, targets, _, _ = next(iter(loader))
    start = time.perf_counter()
    for _ in range(batches):
        step(imgs, targets)
    bare = batches * len(imgs) / (time.perf_counter() - start)
    return real, bare


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', default=demo.YOLOV3['cfg'], help='model definition (.cfg)')
    parser.add_argument('--weights', help='trained weights (.pt/.weights); default random')
    parser.add_argument('--img-size', type=int, default=demo.IMG_SIZE)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--batches', type=int, default=20, help='training batches to time')
    parser.add_argument('--workers', type=int, default=2)
    args = parser.parse_args(argv)
    options = parse_data_cfg(demo.ensure_demo_data())
    model = Darknet(args.cfg)
    if args.weights:
        load_weights(model, args.weights)
    valid, _ = create_dataloader(options['valid'], args.img_size, args.batch_size,
                                 options['classes'], rect=True, workers=args.workers,
                                 stride=model.stride)
    result = evaluate(model, valid, options['classes'], progress=False)
    total = sum(result.seconds.values())
    print(f'evaluation of {result.images} images, {total:.2f} s '
          f'(mAP@0.5 {result.metrics["map50"]:.3f}):')
    for name, seconds in result.seconds.items():
        print(f'  {name:9s} {seconds:6.2f} s  {seconds / total:6.1%}')
    post = total - result.seconds['model']
    print(f'  NMS + matching + metrics: {post / total:.1%} of evaluation (target < 20%)')
    train, _ = create_dataloader(options['train'], args.img_size, args.batch_size,
                                 options['classes'], augment=True, workers=args.workers,
                                 shuffle=True, stride=model.stride)
    real, bare = training_throughput(model, train, args.batches)
    print(f'training: {real:.1f} images/s with data loading and augmentation '
          f'({args.workers} workers), {bare:.1f} images/s bare forward+backward+step; '
          f'loading costs {1 - real / bare:.0%} of the bare rate')


if __name__ == '__main__':
    main()
