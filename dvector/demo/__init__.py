"""demo: synthetic speakers (``synth``) and the whole pipeline on them (``run``), for trying dvector
without data and for the tests' fixtures.

Owns: synthetic data and the demo run. May import every part, never ``cli``.
"""
