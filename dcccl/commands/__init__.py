"""The ``dcccl`` commands: the stage CLI, the stage runner, and one module per command (``pipeline``, ``compare``,
``ablate``, ``export``, ``audit``). They run the core through Lightning; ``cli.py`` only wires them to the console
script."""
