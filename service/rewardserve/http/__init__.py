"""REST transport: FastAPI app, routers and middleware. No model logic lives here."""
