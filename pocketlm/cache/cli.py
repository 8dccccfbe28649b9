"""CLI for the cache stage (filled in by its issue)."""


def register(sub) -> None:
    pass
