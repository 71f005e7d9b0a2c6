"""Galatea: self-hosted persona chat for LLaMA-architecture models."""

import os

__version__ = "0.1.0"

# torch's OpenMP workers spin after every parallel region by default (libgomp reads this when
# torch is first imported, so it is set here, before). Beside the native kernels' own thread
# pool on the same cores the spinning costs more than it saves: SmolLM2's prompt reading (which
# alternates torch ops and kernels) went from 865-888 to 990-1093 tok/s on a quiet 2-core
# machine, and from 454-499 to 683-806 with another process busy on one core. A user's own
# OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
