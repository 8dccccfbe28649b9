"""The data stage: every source as an iterator of documents or chats (see `sources.open_source`).

It never tokenizes. One module per source; `sources` holds the registry and the spec syntax,
`rows` the hub/local-file streaming shared by the loaders.
"""
