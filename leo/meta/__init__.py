"""Meta-learning around the model: episodes, the outer training loop, evaluation.

Modules: ``episodes`` (seeded N-way K-shot sampling on the device), ``prefetch`` (the next
batch drawn on a thread), ``loop`` (the outer loop shared by LEO and MAML: validation, best
checkpoint, exact resume, logging), ``train`` (LEO's meta-training), ``evaluate`` (the
paper's protocol for any linear classifier).
"""
