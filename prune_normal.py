"""Prune channels, normal mode: every BN conv except those a shortcut sums and those feeding an upsample.

    python prune_normal.py --cfg CFG --weights SPARSE.pt --data DATA --percent 0.5

With no arguments it prunes the sparse demo model on the demo data.
"""
from cli.prune import main
from utils.errors import run_cli

if __name__ == '__main__':
    run_cli(lambda argv: main('normal', argv))
