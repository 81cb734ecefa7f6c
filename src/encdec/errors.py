"""The one exception type the CLI turns into a single readable line."""


class EncdecError(Exception):
    """Bad user input or an unsupported configuration: the message says what was wrong and what is accepted."""
