"""CLI for the model stage (filled in by its issue)."""


def register(sub) -> None:
    pass
