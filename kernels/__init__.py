"""mambatrain's scan kernels, importable as ``mambatrain_kernels``.

Each op lives in its own folder: ``naive.py`` is the recurrence written as a
plain loop (the specification, the CPU path and the test oracle), ``triton.py``
the fast GPU version with the same signature.
"""
