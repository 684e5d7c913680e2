"""Route groups of the hardneg HTTP API, one module each."""
