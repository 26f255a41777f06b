"""Command-line entry points: a user's mistake is one line on stderr and exit status 2.

  python train.py --config.datset=mnist       ->  error: ... (status 2)
  python search.py --workdir /no/such/dir     ->  error: workdir '/no/such/dir' does not exist ...

The library reports bad input (a config value, a workdir, an impossible target, a diverging
loss) with the exceptions in ``USER_ERRORS``, and ``run(main)`` turns them into that one line;
any other exception is a bug and keeps its traceback. ``--traceback`` shows the traceback of a
user error too (where in the code it was raised). Bad flags, which absl reports as "FATAL Flags
parsing error" plus a help hint and status 1, get the same one line and status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, KeyError,
               app.UsageError)
EXIT_USER_ERROR = 2

_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "on bad input (a config value, a missing workdir, an impossible target: "
    "exit status 2) print the full Python traceback instead of the one line 'error: ...'")


def message(error: BaseException) -> str:
  """The exception's text on one line: a KeyError's without repr quotes, a wrapped exception's
  (ml_collections raises ``AttributeError(KeyError("'x', did you mean 'y'?"))``) unwrapped."""
  while len(error.args) == 1 and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else error
  text = str(text).strip() or type(error).__name__
  if isinstance(error, (KeyError, AttributeError)):  # a bare key or name says little alone
    text = f"{type(error).__name__}: {text}"
  return " ".join(text.split())


def _wants_traceback(argv: list[str]) -> bool:
  """--traceback given, for errors raised before the flags are parsed."""
  return any(a.lstrip("-") in ("traceback", "traceback=true", "traceback=1") for a in argv)


def fail(text: str) -> NoReturn:
  """Prints ``error: <text>`` on stderr and exits with status 2."""
  sys.stdout.flush()
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def run_main(fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(*args)``; a ``USER_ERRORS`` exception becomes ``error: <message>`` and exit status 2
  (re-raised with its traceback under ``--traceback``)."""
  try:
    return fn(*args)
  except USER_ERRORS as e:
    if not flags.FLAGS.is_parsed() or _TRACEBACK.value:  # unparsed: not from the command line
      raise
    fail(message(e))


# Raised while parsing flags: absl's own errors, and what ml_collections lets through for a
# --config.key=value override that does not fit (AttributeError(KeyError) for an unknown key).
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError)
_config_flags = []  # the FlagHolders of define_config_file


def _flag_error(error: BaseException, argv: list[str], context: str) -> NoReturn:
  if _wants_traceback(argv):
    raise error
  text = str(error)
  if "Traceback (most recent call last)" in text:  # the config file's own code failed: keep it
    fail(f"{context}{text}")
  fail(f"{context}{message(error)}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with a bad flag, a ``--config.key=value`` override that does not fit
  the config, or a missing config file as one ``error:`` line, status 2 (absl: "FATAL Flags
  parsing error", a help hint, status 1). For ``app.run(..., flags_parser=parse_flags)``."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _flag_error(e, argv, "")
  except _FLAG_ERRORS as e:
    names = "/".join(f"--{h.name}" for h in _config_flags) or "--config"
    _flag_error(e, argv, f"{names}.key=value override: ")
  for holder in _config_flags:
    try:  # ml_collections defers a config file's IOError to the first use of the config
      getattr(holder.value, "keys", None)
    except OSError as e:
      _flag_error(e.__cause__ or e, argv, f"--{holder.name}: ")
  return rest


def define_config_file(name: str, default: str, help_string: str):
  """``config_flags.DEFINE_config_file``, checked by ``parse_flags``. Without ``--<name>`` on
  the command line it loads ``default`` and applies the ``--<name>.key=value`` overrides right
  here, at import: a bad override is then the same one line."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string)
  except _FLAG_ERRORS as e:
    _flag_error(e, sys.argv, f"--{name} {default} with the --{name}.key=value overrides: ")
  _config_flags.append(holder)
  return holder


def run(main: Callable[[list[str]], Any]) -> None:
  """``app.run(main)`` with ``parse_flags`` and ``run_main`` around it."""
  app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
