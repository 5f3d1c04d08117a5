"""ueguard: make image data unlearnable, and verify honestly whether the protection holds.

Public entry points: the ``ueguard`` command line (``ueguard.cli``) and the Python SDK
(``ueguard.sdk.protect`` / ``ueguard.sdk.verify``). Nothing heavy is imported here.
"""

__version__ = "0.1.0"
