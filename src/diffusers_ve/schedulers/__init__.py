from .scheduling_ve import VEScheduler

__all__ = ["VEScheduler"]
