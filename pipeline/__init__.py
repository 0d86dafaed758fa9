"""midpo stages 2-3 and the library they share. Importing this package imports nothing heavy
(in particular not deepspeed), so `pipeline.losses` and `pipeline.priors` load on their own."""

__version__ = "0.1.0"
