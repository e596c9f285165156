"""Comparing methods on the same episodes: LEO's ablations, MAML, baselines, statistics,
test-time latent ensembles and the paper's Figure 2.

Modules: ``methods`` (the registry), ``baselines`` (nearest class mean, logistic
regression), ``maml``, ``stats`` (intervals, paired differences, calibration),
``ensemble``, ``figures`` (Figure 2 with openTSNE), ``options`` (:class:`CompareSettings`),
``tables`` (the Markdown tables), ``compare`` (:func:`compare`: one shot configuration end
to end; also ``leo.compare``).
"""
