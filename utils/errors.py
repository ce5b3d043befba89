"""The one error type users see, and the wrapper that turns it into a clean exit.

Every problem caused by the user's input (a file, a flag, a cfg line) raises
`UserInputError` with a one-line message that names the file, line or layer and says
how to fix it (a bad flag too: cli.common.ArgumentParser). Scripts wrap `main` in
`run_cli`, which prints that line and exits 2:
no traceback for a user error. Anything else is a bug and keeps its traceback.
Ctrl-C and SIGTERM both end a script as KeyboardInterrupt: one line, exit 130.
"""
import signal
import sys
import threading


class UserInputError(Exception):
    """A problem with the user's input; the message is shown to the user as is."""

    def __init__(self, message=''):
        # A DataLoader worker's error reaches the main process re-raised as
        # UserInputError('Caught UserInputError in DataLoader worker process 0.\nOriginal
        # Traceback ...\nutils.errors.UserInputError: <message>'): keep the user's line.
        marker = f'{__name__}.UserInputError: '
        if isinstance(message, str) and message.startswith('Caught ') and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def raise_interrupt(signum, frame):
    """SIGTERM handler: stop the way Ctrl-C does, so `finally` blocks remove temporary
    files (the default action kills the process on the spot)."""
    raise KeyboardInterrupt()


def run_cli(main, argv=None):
    """Run `main(args)`-style entry point `main()` and map UserInputError to exit 2,
    Ctrl-C and SIGTERM to exit 130."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return main(argv)
    except UserInputError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
