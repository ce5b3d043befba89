"""Output files: checked folders, atomic writes, write failures in one line, one run per folder.

1. `require_output_dir` / `require_output_file`: before any work, a script checks that its
   output folder can be created and written; a file in the way, a path under a file, no
   permission or a read-only file system is refused in one line naming the path.
2. `atomic_output`: write to `.NAME.tmpPID` in the target folder, then rename. A run
   killed mid-write leaves the old file or the new one, never a torn one. A write that
   fails part-way (disk full, file too large, I/O error) removes the temporary file,
   keeps the old file and becomes one UserInputError line. A temporary file left by a
   writer that was SIGKILLed is removed by the next write of the same name.
3. `output_group`: files written inside it appear together at its end, or none do.
4. Ctrl-C (or SIGTERM under `run_cli`) during a write waits for the bytes to be written,
   then discards them: the file is not renamed into place and the run exits 130.
5. `output_lock`: one training run per output folder (`flock` on `FOLDER/.lock`).
"""
import contextlib
import errno
import glob
import os
import re
import signal
import threading

from utils.errors import UserInputError, raise_interrupt

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None

# errno -> (what happened, what to do), for the one-line message of a failed write
WRITE_ERRORS = {
    errno.ENOSPC: ('the disk is full', 'free space and run again'),
    errno.EDQUOT: ('the disk quota is used up', 'free space and run again'),
    errno.EFBIG: ('the file is larger than this file system or the file-size limit '
                  '(ulimit -f) allows', 'write elsewhere or raise the limit and run again'),
    errno.EIO: ('a disk or network error', 'check the disk or the network share and run '
                'again'),
    errno.EROFS: ('the file system is read-only', 'choose a writable folder'),
    errno.EACCES: ('permission denied', 'choose a folder you can write to'),
    errno.EPERM: ('the operation is not permitted here', 'choose a folder you can write to'),
}

_local = threading.local()  # .group: the open output_group's pending renames
_held = None  # signals received while files are written; None when none are deferred


# ---------------------------------------------------------------- checking a folder

def _nearest_existing(path):
    """`path` or its nearest ancestor that exists (as a file or a folder)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def require_output_dir(path, flag='--output-dir', named=None):
    """The absolute output folder, checked writable before any work starts; messages
    name `flag` and `named` (default: `path`).

    Nothing is created: a missing folder is checked by creating and removing a probe
    folder in its nearest existing ancestor (the writers create it when they write)."""
    folder = os.path.abspath(path)
    named = path if named is None else named
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        what = '' if existing == os.path.abspath(named) else f'{existing} '
        raise UserInputError(f'{flag} {named}: {what}is a file, not a folder; choose another '
                             f'{flag} or move the file')
    probe = os.path.join(existing, f'.write-check{os.getpid()}')
    try:
        if existing == folder:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.remove(probe)
        else:
            os.mkdir(probe)
            os.rmdir(probe)
    except OSError as e:
        what, fix = WRITE_ERRORS.get(e.errno, (e.strerror, f'choose another {flag}'))
        action = 'write in' if existing == folder else 'create folders in'
        raise UserInputError(f'{flag} {named}: cannot {action} {existing}: {what}; '
                             f'{fix}') from None
    return folder


def require_output_file(path, flag='--output'):
    """`path` checked as a file to write: not a folder, and its folder writable."""
    if os.path.isdir(path):
        raise UserInputError(f'{flag} {path}: is a folder; pass a file name')
    require_output_dir(os.path.dirname(path) or '.', flag, named=path)
    return path


def resolved_inputs(paths):
    """{real path: path} of `paths` (None skipped), for `overwritten_input`: symlinks
    resolved, so a link to an input is that input (abspath would not see it)."""
    return {os.path.realpath(p): p for p in paths if p}


def overwritten_input(path, inputs):
    """The input that writing `path` would replace, or None. `inputs`: paths, or
    resolved_inputs' dict when many outputs are checked against one long list."""
    inputs = inputs if isinstance(inputs, dict) else resolved_inputs(inputs)
    return inputs.get(os.path.realpath(path))


def refuse_overwrite(path, inputs, fix, flag=None):
    """Refuse to write `path` over one of `inputs`: '[FLAG ]PATH: would overwrite an input
    file; FIX'."""
    if overwritten_input(path, inputs):
        named = f'{flag} {path}' if flag else path
        raise UserInputError(f'{named}: would overwrite an input file; {fix}')


# ---------------------------------------------------------------- atomic writes

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder, name):
    """Remove `.NAME.tmpPID` files of writers that no longer run (SIGKILLed mid-write)."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), f'.{glob.escape(name)}.tmp*')):
        match = re.fullmatch(r'\.(.*)\.tmp(\d+)', os.path.basename(tmp))
        if match and match.group(1) == name and int(match.group(2)) != os.getpid() \
                and not _pid_alive(int(match.group(2))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def _deferrable(signum, handler):
    """Signals whose current handler would raise KeyboardInterrupt: run_cli's SIGTERM
    handler and Python's own Ctrl-C. Others (train.py's, SIG_IGN, SIG_DFL) are left be."""
    return handler is raise_interrupt or (signum == signal.SIGINT
                                          and handler is signal.default_int_handler)


@contextlib.contextmanager
def _holding(signals):
    """Ctrl-C and SIGTERM received inside the block appended to the yielded list instead
    of acted on, for each of `signals` (a subset of the two)."""
    held, previous = [], {}
    for s in signals:
        previous[s] = signal.getsignal(s)
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_deferred():
    """Yield a list that collects the Ctrl-C/SIGTERM received inside the block, instead
    of raising at once: an exception inside torch.save breaks its zip writer into a
    RuntimeError, and a half-written file must not be renamed into place."""
    global _held
    if _held is not None or threading.current_thread() is not threading.main_thread():
        yield _held if _held is not None else []
        return
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if _deferrable(s, signal.getsignal(s))]
    with _holding(signals) as held:
        _held = held
        try:
            yield held
        finally:
            _held = None


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM, whatever their handlers, while a block writes several
    files that belong together, and yield the list of those received: the caller acts
    on them after the last file (training/engine.py's epoch commit). Each file inside
    is still written and renamed whole by atomic_output."""
    with _holding((signal.SIGINT, signal.SIGTERM)) as held:
        yield held


def _errno_of_short_write(tmp):
    """numpy's tofile reports a short write without its errno: append one byte more to
    the temporary file to learn it (the file is discarded anyway)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, b'\0')
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
    return None


def _write_failure(error, tmp):
    """(errno, strerror) when `error` is a failed write, else None. torch.save turns the
    file's OSError into a RuntimeError whose context is the OSError."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            return e.errno, e.strerror
    if isinstance(error, OSError) and error.errno is None and 'written' in str(error):
        code = _errno_of_short_write(tmp)
        return (code, os.strerror(code)) if code in WRITE_ERRORS else (None, str(error))
    return None


def write_error(path, code, reason, existed):
    what, fix = WRITE_ERRORS.get(code, ('the write stopped short', 'check free space and run '
                                        'again'))
    kept = ' and the previous file is unchanged' if existed else ''
    return UserInputError(f'{path}: {what} ({reason}); nothing was written{kept}; {fix}')


@contextlib.contextmanager
def atomic_output(path, mode='wb'):
    """Open a temporary file beside `path`; on success it replaces `path` in one rename
    (at the end of the enclosing output_group, if one is open)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if os.path.isdir(path):
        raise UserInputError(f'{path}: is a folder; choose another output name')
    existed = os.path.exists(path)
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}')
    with _signals_deferred() as held:
        try:
            try:
                os.makedirs(folder, exist_ok=True)
                remove_stale_temporaries(folder, name)
                with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
            except Exception as e:
                failure = _write_failure(e, tmp)
                if failure is None:
                    raise
                raise write_error(path, *failure, existed) from None
            if held:
                raise KeyboardInterrupt()
            group = getattr(_local, 'group', None)
            if group is not None:
                group.append((tmp, path))
                tmp = None
            else:
                os.replace(tmp, path)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


def atomic_write_text(path, text):
    with atomic_output(path, 'w') as f:
        f.write(text)


@contextlib.contextmanager
def output_group():
    """Files written with atomic_output inside the block are renamed into place
    together at its end; an error or an interrupt inside leaves none of them (and the
    previous versions as they were)."""
    if getattr(_local, 'group', None) is not None:
        yield
        return
    pending = _local.group = []
    try:
        with _signals_deferred() as held:
            yield
            if held:
                raise KeyboardInterrupt()
            while pending:
                os.replace(*pending.pop(0))
    finally:
        _local.group = None
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


# ---------------------------------------------------------------- one run per folder

@contextlib.contextmanager
def output_lock(folder, enabled=True, flag='--output-dir'):
    """Hold an exclusive flock on FOLDER/.lock for the block; refuse a second holder.

    The kernel drops the lock when its process dies, so a killed run never leaves a
    stale lock; the file itself is removed on the way out. After taking the lock the
    file must still be the one at FOLDER/.lock (a leaving holder may have just removed
    it), else it is taken again."""
    if not enabled or fcntl is None:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, '.lock')
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserInputError(f'{flag} {folder}: another run is writing into this folder '
                                 f'(it holds {path}); wait for it to end or choose another '
                                 f'{flag}') from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)
