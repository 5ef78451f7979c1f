"""The one exception type a user can act on.

Anything raised as `UserError` is printed by the CLI as a single line (no traceback) and the
process exits with status 2. Raise it for mistakes the user can fix: a bad config key, a
missing shard, an incompatible checkpoint.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the cause and what to do."""
