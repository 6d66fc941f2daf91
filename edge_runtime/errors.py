"""The one exception type that user-facing code turns into a one-line message and a non-zero exit."""


class EdgeRuntimeError(Exception):
    """Bad input, unsupported model, corrupt file, missing device: anything a user can fix.

    The message must be a single line that says what is wrong and, where possible, what to do.
    """


class ModelFormatError(EdgeRuntimeError):
    """A packed model directory or Hugging Face checkpoint that cannot be read as promised."""


class UnsupportedModelError(EdgeRuntimeError):
    """An architecture or option this runtime does not implement."""
