"""From a trained detector to a deployed pruned one in one command: evaluate, sparsity-train
(stopped once the pruned mAP has caught up), prune at the target, fine-tune, write and
check final.cfg/final.weights/final.onnx, and report (docs/pipeline.md).

    python pipeline.py --cfg cfg/yolov3-tiny-shapes.cfg --weights weights/yolov3-tiny-shapes.pt \
        --data data/shapes.data --target-params 0.6 --sparsity-epochs 12 --finetune-epochs 6

With no arguments: the tiny demo model on the demo data, --target-params 0.6, 3 sparsity
and 2 fine-tuning epochs. Interrupted, the same command goes on from the stage it was in.
"""
from cli.pipeline import main
from utils.errors import run_cli

if __name__ == '__main__':
    run_cli(main)
