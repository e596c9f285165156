"""LEO: Latent Embedding Optimization (Rusu et al., ICLR 2019) in PyTorch.

Modules (one concept each):
  config     -- LEOConfig and the four published presets.
  model      -- the LEO math as pure functions over named parameters.
  noise      -- pre-drawn noise for a batch, from an explicit generator.
  optim      -- the outer update: NaN fallback, clipping, TensorFlow-style Adam.
  explicit   -- a batch's meta-loss and exact meta-gradient by a hand-derived reverse pass.
  batched    -- the outer step (explicit gradients, or vmap + autograd); compiled.
  prefetch   -- the next batch's episodes and noise drawn on a background thread.
  episodes   -- seeded N-way K-shot episode sampling on the device.
  store      -- the Parquet embedding store.
  safe_pickle-- a pickle loader that admits only dicts, lists, strings and numpy arrays.
  published  -- import of the published LEO embeddings into the Parquet store.
  train      -- meta-training loop with validation, checkpoints and resume.
  evaluate   -- the paper's evaluation protocol (10,000 episodes, mean and 95% CI).
  synthetic  -- clearly-labelled synthetic few-shot problems for tests and benchmarks.
  baselines  -- nearest class mean (cosine, Euclidean) and logistic regression.
  maml       -- MAML on the same embeddings (second order, vmapped).
  methods    -- the registry of methods compared on the same episodes.
  stats      -- confidence intervals, paired differences, expected calibration error.
  ensemble   -- test-time ensembles of latent samples.
  tsne       -- exact t-SNE in torch; figures -- the paper's Figure 2.
  report     -- pipeline metrics and training-curve plots.
  data       -- raw datasets (Omniglot, miniImageNet, tieredImageNet) and preparation.
  backbone   -- the Wide ResNet feature extractor: pre-training and embedding.
"""

__version__ = "0.1.0"
