"""CLI for the data stage (filled in by its issue)."""


def register(sub) -> None:
    pass
