"""The few typed errors the core raises; the CLI turns each into one line and an exit code."""


class ZeroplanError(Exception):
    """Base of every error zeroplan reports to a user as one line (exit status 2)."""

    exit_code = 2
    label = "error"


class UnknownModel(ZeroplanError):
    """A model name or profile path that resolves to nothing."""


class UnknownGPU(ZeroplanError):
    """A GPU profile name that resolves to nothing."""


class InvalidProfile(ZeroplanError):
    """A profile file that is not valid TOML/JSON or breaks the schema."""


class InvalidInput(ZeroplanError):
    """An argument outside what is accepted (negative GPUs, impossible batch arithmetic...)."""


class InvalidConfig(ZeroplanError):
    """A DeepSpeed config that DeepSpeed's own schema rejects, or that cannot be read."""


class DoesNotFit(ZeroplanError):
    """No plan fits the GPU; carries the suggestions that would make one fit (exit status 3)."""

    exit_code = 3

    def __init__(self, message: str, suggestions: tuple[str, ...] = ()):
        super().__init__(message)
        self.suggestions = suggestions


class MissingDependency(ZeroplanError):
    """A heavy optional dependency (torch, deepspeed, transformers) is not importable."""


class Interrupted(ZeroplanError):
    """Ctrl-C or SIGTERM stopped a long command; the message says what was kept and how to resume."""

    exit_code = 130
    label = "interrupted"
