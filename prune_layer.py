"""Layer pruning: remove the weakest residual blocks (depth), optionally channels too (width).

    python prune_layer.py --cfg CFG --weights SPARSE.pt --data DATA --layers 8 --percent 0.5

Blocks are ranked by the |gamma| of their branch convs (utils/layer_prune.py says how);
--percent then prunes channels of the result in shortcut mode. With no arguments it
prunes the sparse demo YOLOv3 on the demo data.
"""
from utils.errors import run_cli
from utils.layer_prune import main

if __name__ == '__main__':
    run_cli(main)
