"""mambatrain's kernels (the scans, the conv + SiLU, the norms, the linear + cross-entropy), importable as
``mambatrain_kernels``.

Each op lives in its own folder: ``naive.py`` is the op written as a plain
loop (the specification and the test oracle; for the scans also the CPU path),
``triton.py`` the fast GPU version with the same signature.
"""
