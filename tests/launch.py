"""A real multi-process CPU launch for tests: gloo over a free loopback port (parallel runs must not collide)."""

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int = 2) -> list:
    """``accelerate launch`` with N real processes; run it with ``ACCELERATE_USE_CPU=1`` in the environment
    (``--cpu --num_processes 2`` would silently start one)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]
