"""Errors users can act on. Each message names the argument and what was expected."""


class SpecDecodeError(Exception):
    """Base class for every error raised on bad input."""


class InvalidArgument(SpecDecodeError, ValueError):
    """An argument has a value we cannot use."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        self.message = message
        super().__init__(f"{argument}: {message}")

    def __reduce__(self):
        # Rebuilt from both arguments, so it can cross process boundaries (Ray workers).
        return (type(self), (self.argument, self.message))


class ModelLoadError(SpecDecodeError):
    """A model folder is missing, malformed or of an unsupported kind."""


class UnsupportedModel(ModelLoadError):
    """The native backend does not implement this architecture (the hf backend may)."""
