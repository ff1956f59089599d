"""The user-error convention of every gqa-* command.

A `UserError` is a mistake of the user's (a bad flag, a missing gin setting, a path that does not
exist, a corrupt checkpoint, missing data): its message is one line, `<what is wrong, naming the
file/setting/value>; <how to fix it>`. The commands print it as `gqa-<cmd>: error: <message>` and
exit 1 (on a pod every process does: `pod.fail`); anything else is a bug and keeps its traceback.
"""
import contextlib
import sys
from typing import Iterator


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
    # The library's other reads of the same data fail too, as coroutines that are never
    # awaited; Python would print each one ("Exception ignored in ...") as it is collected.
    sys.unraisablehook = lambda unraisable: None
    detail = one_line(e)
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    raise UserError(f"{what}: cannot be read, it is truncated or corrupt ({type(e).__name__}: "
                    f"{detail}); write, copy or download the checkpoint again") from e
