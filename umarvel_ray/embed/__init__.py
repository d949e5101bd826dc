"""Step `embed`: the restartable Ray Data embedding job (CPU decode tasks -> embedder actors ->
shards committed by the driver into the store)."""
