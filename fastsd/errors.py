"""The errors a request or a deployment can meet, each shown as one sentence."""


class InputError(ValueError):
    """A request input is wrong. The message names the input and what is allowed; field is the
    input's name (realtime tells a client which field to fix), None for the request as a whole."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConfigurationError(ValueError):
    """The deployment is wrong (environment variables, weights on disk): setup cannot go on."""


class ContentWithheld(ValueError):
    """The safety checker withheld every image of a request."""
