"""The one exception type users see: a clear, one-line message, shown without a traceback."""


class EdgegenError(Exception):
    """Bad input or an unmet precondition; the message names the file and what is wrong.

    The CLI prints ``edgegen: error: <message>`` and exits with status 2. Library callers
    catch it like any exception.
    """
