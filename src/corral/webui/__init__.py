"""`corral webui`: the browser twin of the CLI (train, chat, evaluate, export).

Every form field comes from the config's field metadata (`corral.config.fields`); every run
started here is an ordinary `corral ...` subprocess whose YAML and command line the page shows.
"""
