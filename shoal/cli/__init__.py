"""The ``shoal`` command: argument parsing and the error edge.

Each package that offers commands has a ``cli`` module with ``register(subparsers)``;
:mod:`shoal.cli.main` lists them. Handlers return an exit status; a
:class:`shoal.errors.ShoalError` escaping a handler is printed as one sentence.
"""
