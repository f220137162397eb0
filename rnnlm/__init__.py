"""rnnlm: character-level recurrent language models trained as a distributed torchrun job.

The library does no work at import: no environment reads, no logging set-up, no device probing.
Data flows one way: corpus -> vocab -> batching -> model -> loop -> artifacts, wired together
by :mod:`rnnlm.pipeline`.
"""

__version__ = "0.1.0"
