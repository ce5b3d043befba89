"""--cache: a data set's decoded, letterboxed images kept in memory, so that an epoch
decodes no file. The estimate is printed before any work, and a cache that would not fit
in the memory the system has available is refused with one line.

The images are decoded once in the main process, before the loader starts its workers:
forked workers then share them (each would otherwise fill a copy of its own).
"""
import os
from concurrent.futures import ThreadPoolExecutor

from utils.errors import UserInputError

GIB = 2 ** 30


def available_memory():
    """Bytes the system can still hand out: MemAvailable from /proc/meminfo (free memory
    and the caches it can drop), else the free pages sysconf reports; None if unknown."""
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(what, count, nbytes, available):
    """The estimate line, or a refusal when `nbytes` exceed `available` (None: unknown)."""
    have = f' of {available / GIB:.2f} GiB available' if available is not None else ''
    if available is not None and nbytes > available:
        raise UserInputError(f'--cache: {what} needs {nbytes / GIB:.2f} GiB for {count} '
                             f'decoded images{have}; train without --cache or at a smaller '
                             '--img-size')
    return f'{what}: caching {count} decoded images, {nbytes / GIB:.2f} GiB{have}'


def cache_images(what, shapes, load):
    """[load(0), load(1), ...], one per (h, w) of `shapes` (3 bytes a pixel), after
    printing the estimate; refused when it would not fit. Threads: image decoding
    releases the interpreter lock."""
    nbytes = sum(3 * h * w for h, w in shapes)
    print(check_cache_fits(what, len(shapes), nbytes, available_memory()), flush=True)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(load, range(len(shapes))))
