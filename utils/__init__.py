"""Utilities: losses, POD, pseudo-labels, regularisers, distributed helpers, logging, checkpoints."""
