"""The LEO model: config, the math as pure functions, its hand-derived meta-gradient, noise,
the outer optimiser and the batched outer step. Read beside ``docs/model.md``.

Modules: ``config`` (LEOConfig, presets), ``model`` (points 1-11 of the model, one episode),
``explicit`` (a batch's meta-loss and exact second-order gradient by hand), ``noise``
(pre-drawn randomness), ``optim`` (NaN fallback, clipping, TensorFlow-style Adam), ``step``
(``MetaStep`` and ``BatchAdapter``: the batched step and evaluation-mode adaptation).
"""
