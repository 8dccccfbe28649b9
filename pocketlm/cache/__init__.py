"""The token cache: sources tokenized once into shards (`build_cache`), checked reading (`shards`),
and training batches (`dataset`). The format is specified in docs/CACHE.md."""
