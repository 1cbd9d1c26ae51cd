"""Applications built on the public API: ``wuneng demo`` (:mod:`wuneng.apps.demo`) and ``wuneng bench-arch``
(:mod:`wuneng.apps.bench_arch`).

They sit above the library (nothing in ``wuneng`` imports them but the CLI, lazily), train through
:func:`wuneng.train.loop.train` like any user's script, and need the ``plot`` extra for their figures.
"""
