"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (a missing file, a misnamed column, a
bad flag value). The CLI prints its message as one line and exits with code 2; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2.

    The message names the file, column or value at fault and, where it helps, what would be accepted.
    """

    exit_code = 2
