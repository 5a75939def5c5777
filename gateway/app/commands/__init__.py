"""One module per ``portcullis`` command: each adds its parser (``add_parser``) and runs it."""
