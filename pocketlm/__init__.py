"""pocketlm: train your own small chat language model on one machine, and watch it think."""

__version__ = "0.1.0"


class PocketLMError(Exception):
    """A user-facing error: the CLI prints its message as one line, without a traceback.

    Messages name the file / field / line at fault and the fix.
    """
