"""Shared pytest setup for ueguard.

Triton decides at ``@triton.jit`` time whether kernels are compiled or interpreted, from
``TRITON_INTERPRET``; it must therefore be set before anything imports triton. With it set, the
Triton kernels run on CPU tensors through the interpreter (convention 6 of the style guide).
A GPU job can export ``TRITON_INTERPRET=0`` to test the compiled kernels instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
