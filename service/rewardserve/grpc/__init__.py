"""gRPC transport (grpc.aio): servicers, conversion, server. No model logic lives here."""
