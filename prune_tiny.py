"""Prune channels, tiny mode (YOLOv3-tiny-like cfgs without shortcuts): every BN conv except those feeding an upsample.

    python prune_tiny.py --cfg CFG --weights SPARSE.pt --data DATA --percent 0.5

With no arguments it prunes the sparse demo model on the demo data.
"""
from cli.prune import main
from utils.errors import run_cli

if __name__ == '__main__':
    run_cli(lambda argv: main('tiny', argv))
