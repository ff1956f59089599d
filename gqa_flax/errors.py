"""The user-error convention of every gqa-* command.

A `UserError` is a mistake of the user's (a bad flag, a missing gin setting, a path that does not
exist, a corrupt checkpoint, missing data): its message is one line, `<what is wrong, naming the
file/setting/value>; <how to fix it>`. The commands print it as `gqa-<cmd>: error: <message>` and
exit 1 (on a pod every process does: `pod.fail`); anything else is a bug and keeps its traceback.
"""
import argparse
import contextlib
import sys
from typing import Iterator, NoReturn


class UserError(ValueError):
  """A mistake of the user's, described in one line: what is wrong; how to fix it."""


class MissingPathError(UserError, FileNotFoundError):
  """A path the user named (a checkpoint, a file, a directory) does not exist or is empty."""


def one_line(error: BaseException) -> str:
  """The first line of an error's message (gin appends the configurable and file on others)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
  """Reading `what` (a file, or a checkpoint's array): any failure but a UserError means the
  data is truncated or corrupt, and becomes a one-line UserError naming `what`."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a decoder's error, any library's)
    detail = one_line(e)
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    raise UserError(f"{what}: cannot be read, it is truncated or corrupt ({type(e).__name__}: "
                    f"{detail}); write, copy or download the checkpoint again") from e


def silence_unraisable() -> None:
  """For a command about to exit after its one-line error: drops Python's "Exception ignored
  in ..." reports for the rest of the process. A failed read leaves a library's other reads
  of the same data failing as coroutines that are never awaited (Orbax's), each reported as
  it is collected; the line already said what is wrong. Never for library code."""
  sys.unraisablehook = lambda unraisable: None


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the gqa-* commands: a bad or missing flag is one line (`prog: error: ...;
  see prog --help`) and exit 1, instead of the usage block and exit 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(1, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def positive_int(text: str) -> int:
  """An argparse type: an integer of at least 1."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
  return value
