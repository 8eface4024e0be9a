"""Best-of-N: sampling, selection, speculative rejection and rerank over the scorer."""
