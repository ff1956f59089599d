"""Processes of this host: whether one still runs (to sweep what dead ones left behind)."""
import os


def alive(pid: int) -> bool:
  """Whether process `pid` of this host runs (another user's live process counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
