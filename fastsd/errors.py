"""The two kinds of error a person can cause, each shown to them as one sentence."""


class InputError(ValueError):
    """A request input is wrong. The message names the input and what is allowed."""


class ConfigurationError(ValueError):
    """The deployment is wrong (environment variables, weights on disk): setup cannot go on."""
