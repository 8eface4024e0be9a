"""Pydantic request/response schemas, one module per feature; shared by REST and gRPC."""
