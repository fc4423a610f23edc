"""What every entry point shares: flag errors and run errors as one readable line, never a traceback.

`parse_flags` (given to `absl.app.run(..., flags_parser=...)`) turns a bad `--config.a.b=...`
override into a line naming the whole key and the keys that exist there, exit code 2; ml_collections
itself reports only the last name ("'nope'") with a traceback. `run` calls a command's body and
turns the errors a user can fix (a bad value, a missing file, a training stopped by NaN) into
`error: ...` and exit code 1; `--verbosity=1` (absl) or `LMJAX_TRACEBACK=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from lmjax import config as config_lib

# Errors whose message says what to fix. Anything else is a bug, and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


class UserError(RuntimeError):
    """A failure the user can act on that is not a bad value or a missing file (e.g. a NaN loss)."""


def unknown_key_message(argv: list[str]) -> str | None:
    """Which `--config.a.b=...` override names no key, and the keys that exist at that level."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    config = config_lib.load(path)
    for flag in argv:
        if flag.startswith("--config."):
            problem = config_lib.unknown_key(config, flag[len("--config."):].split("=", 1)[0])
            if problem:
                return f"{problem} (in {flag!r})"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config override errors turned into one readable line."""
    try:
        remaining = flags.FLAGS(argv)
        for name in flags.FLAGS:  # a --config file that failed to load says so only when read
            value = flags.FLAGS[name].value
            if type(value).__name__ == "_ErrorConfig":
                value.keys()
        return remaining
    except OSError as e:
        message = f"a config file could not be loaded: {str(e).strip().splitlines()[-1].strip()}"
    except SyntaxError as e:
        message = f"{e.filename}, line {e.lineno}: {e.msg}"
    except (AttributeError, KeyError) as e:
        try:
            message = unknown_key_message(argv) or f"bad config override: {e}"
        except USER_ERRORS as load_error:
            message = str(load_error)
    except flags.Error as e:
        message = str(e)
    except USER_ERRORS as e:  # the --config file itself is missing or broken
        message = str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def absl_main(body: Callable[[], Any]) -> Callable[[list[str]], None]:
    """The `main` for `absl.app.run(main, flags_parser=parse_flags)` of a command: stray arguments
    refused, library INFO logs off unless --verbosity is given (orbax logs every save), and `body`
    run with one-line errors."""

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        run(body)

    return main


def run(body: Callable[[], Any]) -> Any:
    """`body()`, with a user-fixable error printed as one `error:` line and exit code 1."""
    try:
        return body()
    except (*USER_ERRORS, UserError) as e:
        if _want_traceback():
            traceback.print_exc()
        else:
            print(f"error: {e}\n(--verbosity=1 or LMJAX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def _want_traceback() -> bool:
    if os.environ.get("LMJAX_TRACEBACK"):
        return True
    try:
        return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present
    except KeyError:
        return False
