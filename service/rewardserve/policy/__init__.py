"""Policy backends for Best-of-N: vLLM in process, transformers, a remote OpenAI server."""
