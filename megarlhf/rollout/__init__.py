"""In-process generation on the actor's weights, sampling, reward functions, best-of-n.

Layer: rollout/ (below trainers/, above models/ and parallel/).
"""

from megarlhf.rollout.engine import GenerationEngine, Rollouts
from megarlhf.rollout.sampling import SamplingParams

__all__ = ["GenerationEngine", "Rollouts", "SamplingParams"]
