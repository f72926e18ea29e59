"""deccp: measure and remove Chinese-government censorship and propaganda from Chinese LLMs."""

__version__ = "0.1.0"


class DeccpError(Exception):
    """An error with a message meant for the user (printed as one line by the CLI)."""
