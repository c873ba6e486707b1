"""nestlearn: Nested Learning and HOPE in PyTorch.

See SPEC.md for the mathematics; ``nestlearn --help`` for the command line.
"""

__version__ = "0.1.0"
