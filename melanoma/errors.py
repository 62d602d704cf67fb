"""The base of every failure the project explains to its user."""


class MelanomaError(Exception):
    """A one-line, user-facing failure: what went wrong and where. The CLI prints str(exc) and exits 1."""
