"""The user-error convention of every gqa-* command.

A `UserError` is a mistake of the user's (a bad flag, a missing gin setting, a path that does not
exist, a corrupt checkpoint, missing data): its message is one line, `<what is wrong, naming the
file/setting/value>; <how to fix it>`. The commands print it as `gqa-<cmd>: error: <message>` and
exit 1 (`exit_with`); anything else is a bug and keeps its traceback.
"""
import sys
from typing import NoReturn


class UserError(ValueError):
  """A mistake of the user's, described in one line: what is wrong; how to fix it."""


class MissingPathError(UserError, FileNotFoundError):
  """A path the user named (a checkpoint, a file, a directory) does not exist or is empty."""


def one_line(error: BaseException) -> str:
  """The first line of an error's message (gin appends the configurable and file on others)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def exit_with(prog: str, error: BaseException) -> NoReturn:
  """Prints `prog: error: <first line>` on stderr and exits 1."""
  print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(1)
