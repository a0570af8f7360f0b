"""Continued pretraining: next-token prediction on plain documents, packed by default."""

from corral.train.stages import Stage

STAGE = Stage(name="pt", dataset_kind="lm")
