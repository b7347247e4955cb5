"""Optimizers not in torch: THOR."""

from nbzoo.optim.thor import MINDSPORE_BERT, THOR, PolySchedule

__all__ = ["MINDSPORE_BERT", "THOR", "PolySchedule"]
