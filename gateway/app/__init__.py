"""The application around the core: start-up (``bootstrap``), worker processes, certificates,
the embedded demo, and the ``portcullis`` command line (``cli`` and one module per command in
``commands``). No domain logic: each command calls the core."""
