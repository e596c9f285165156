"""The Wide ResNet feature extractor: architecture, supervised pre-training on the meta-train
classes, augmentation, and the frozen embedding of every split into the Parquet store; both
on several processes (DistributedDataParallel under torchrun: distributed.py, launch.py)."""
