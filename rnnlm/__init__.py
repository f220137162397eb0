"""rnnlm: character-level recurrent language models trained as a distributed torchrun job.

The library does no work at import: no environment reads, no logging set-up, no device probing.
Data flows one way: corpus -> vocab -> batching -> model -> loop -> artifacts, wired together
by :class:`rnnlm.trainer.Trainer`. Optional accelerations live in :mod:`rnnlm.extensions`, which
the core never imports.
"""

__version__ = "0.1.0"
