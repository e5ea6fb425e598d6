"""The guest side: notify channel and credentials."""
