"""The user-error convention of every gqa-* command.

A `UserError` is a mistake of the user's (a bad flag, a missing gin setting, a path that does not
exist, a corrupt checkpoint, missing data): its message is one line, `<what is wrong, naming the
file/setting/value>; <how to fix it>`. The commands print it as `gqa-<cmd>: error: <message>` and
exit 1; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake of the user's, described in one line: what is wrong; how to fix it."""
