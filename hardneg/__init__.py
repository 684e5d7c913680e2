"""hardneg: hard-negative mining for contrastive and metric learning."""

__version__ = "0.1.0"
