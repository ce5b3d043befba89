"""Channel pruning, shortcut mode: not built yet (the pruning issue fills this script).

Running it says so and exits 1; nothing is read or written.
"""
import sys

if __name__ == '__main__':
    print('prune_shortcut.py: channel pruning is not built yet; see the open pruning issue',
          file=sys.stderr)
    sys.exit(1)
