"""LEO: Latent Embedding Optimization (Rusu et al., ICLR 2019) in PyTorch.

Modules (one concept each):
  config     -- LEOConfig and the four published presets.
  model      -- the LEO math as pure functions over named parameters.
  batched    -- vmap over episodes, outer gradient, clipping, NaN fallback, Adam; compiled.
  episodes   -- seeded N-way K-shot episode sampling on the device.
  store      -- the Parquet embedding store.
  safe_pickle-- a pickle loader that admits only dicts, lists, strings and numpy arrays.
  published  -- import of the published LEO embeddings into the Parquet store.
  train      -- meta-training loop with validation, checkpoints and resume.
  evaluate   -- the paper's evaluation protocol (10,000 episodes, mean and 95% CI).
  synthetic  -- clearly-labelled synthetic few-shot problems for tests and benchmarks.
  data       -- raw datasets (Omniglot, miniImageNet, tieredImageNet) and preparation.
  backbone   -- the Wide ResNet feature extractor: pre-training and embedding.
"""

__version__ = "0.1.0"
