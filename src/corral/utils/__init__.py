"""Small helpers every layer may use. Nothing here imports torch at module level."""
