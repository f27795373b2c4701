"""Training: trainers (train steps), losses, callbacks. Importing registers every trainer."""

from covidx.training.trainers import TRAINERS, Trainer, get_trainer, register_trainer

# Importing a paper's training module registers its trainers.
from covidx.training import magsd, moex  # noqa: F401,E402

__all__ = ["TRAINERS", "Trainer", "get_trainer", "register_trainer"]
