"""The errors a request or a deployment can meet, each shown as one sentence."""


class InputError(ValueError):
    """A request input is wrong. The message names the input and what is allowed."""


class ConfigurationError(ValueError):
    """The deployment is wrong (environment variables, weights on disk): setup cannot go on."""


class ContentWithheld(ValueError):
    """The safety checker withheld every image of a request."""
