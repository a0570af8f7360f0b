"""`corral serve`: an OpenAI-compatible HTTP API over corral's inference backends."""
