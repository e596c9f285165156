"""Population-based training of LEO's hyperparameters on Ray Tune (``docs/tune.md``).

:mod:`leo.tune.space` (what is searched), :mod:`leo.tune.trial` (one member: the project's
trainer an interval at a time), :mod:`leo.tune.search` (the scheduler, local or on a
cluster), :mod:`leo.tune.lineage` (fitness, exploits, the winner), :mod:`leo.tune.plots`
(figures), :mod:`leo.tune.outputs` (the files of ``tune@<run>``). Ray is imported by the
modules that need it, not by this package.
"""
