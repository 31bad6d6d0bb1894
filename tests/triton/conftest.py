"""Interpreter tests of the Triton backend (tests/triton).

Run them as their own pytest invocation with the interpreter switched on
before triton is first imported:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton -q

Nothing here is set globally and nothing is skipped: on a machine without a
CUDA GPU these tests run the kernels on the CPU under Triton's interpreter,
and the test module fails loudly when TRITON_INTERPRET is unset and no GPU is
present (instead of silently skipping).
"""
