"""Prune channels, regular mode: normal's layers, kept widths rounded up to powers of two (or --round-to N).

    python prune_regular.py --cfg CFG --weights SPARSE.pt --data DATA --percent 0.5

With no arguments it prunes the sparse demo model on the demo data.
"""
from cli.prune import main
from utils.errors import run_cli

if __name__ == '__main__':
    run_cli(lambda argv: main('regular', argv))
