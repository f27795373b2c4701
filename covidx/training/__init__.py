"""Training: trainers (train steps), losses, callbacks. Importing registers every trainer."""

from covidx.training.trainers import TRAINERS, Trainer, get_trainer, register_trainer

__all__ = ["TRAINERS", "Trainer", "get_trainer", "register_trainer"]
