"""Model repository: manifests, loading and the set of models being served."""
