"""Training of the models the service hosts."""
