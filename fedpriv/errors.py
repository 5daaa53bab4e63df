"""fedpriv's one error hierarchy.

* :class:`UserError` -- something the user can fix (a configuration, a data file, a run folder);
  launchers print it as one line ``fedpriv: error: ...`` and exit with code 2, before any work.
* :class:`ClientError` -- a client that cannot train this round (no rows, a model Opacus cannot
  handle, a lost or unreadable ledger); the ClientApp turns it into an error reply that the server
  counts as failed, and the round goes on.
* Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedprivError(Exception):
    """The root of every error fedpriv raises on purpose."""


class UserError(FedprivError, ValueError):
    """Anything the user can fix; its message is one line naming the problem."""


class ConfigError(UserError):
    """A configuration value or key that cannot run; the message names the key and what is allowed."""


class DataError(UserError):
    """A data set that is missing, unreadable or has the wrong shape."""


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked (resume, one run per folder)."""


class ClientError(FedprivError, RuntimeError):
    """A client that cannot train this round; becomes an error reply, never a stalled round."""
