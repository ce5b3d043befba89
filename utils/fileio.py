"""Atomic file output: write to a temporary name in the target folder, then rename.

A run killed mid-write leaves either the old file or the new one, never a torn one,
and a failed write leaves nothing behind.
"""
import contextlib
import os


@contextlib.contextmanager
def atomic_output(path, mode='wb'):
    """Open a temporary file beside `path`; on success it replaces `path` in one rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    with atomic_output(path, 'w') as f:
        f.write(text)
