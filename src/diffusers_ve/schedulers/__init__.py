from .scheduling_ve import VEScheduler
from .scheduling_ve_heun import VEHeunScheduler

__all__ = ["VEScheduler", "VEHeunScheduler"]
