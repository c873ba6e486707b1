"""Training: the loop, optimizer and schedule, checkpoints, metrics and reports."""

from nestlearn.train.trainer import Trainer, TrainResult

__all__ = ["TrainResult", "Trainer"]
