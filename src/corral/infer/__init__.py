"""One inference engine under `chat`, `serve`, `eval` and the web UI."""
