"""Data in and out: the Parquet embedding store, safe unpickling, the published LEO
embeddings, synthetic problems for tests, prepared images, and the raw few-shot datasets
(``leo.data.raw``: fetching, archives, Omniglot, miniImageNet, tieredImageNet)."""
