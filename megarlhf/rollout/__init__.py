"""In-process generation on the actor's weights, sampling, reward functions, best-of-n.

Layer: rollout/ (below trainers/, above models/ and parallel/).
"""
