"""Reward functions that misbehave, for tests/e2e/test_faults.py (named as
`tests.e2e.faulty_rewards:<name>` in configs)."""

from megarlhf.data.synthetic import sort_reward_batch


def raises(prompts, responses, answers):
    return [1.0 / (len(r) - len(r)) for r in responses]  # ZeroDivisionError


def nan_for_third(prompts, responses, answers):
    scores = sort_reward_batch(prompts, responses)
    scores[2] = float("nan")
    return scores


def none_for_every_third(prompts, responses, answers):
    """None (leave out of the loss) for rows 0, 3, 6, ...: a third of each batch."""
    return [None if i % 3 == 0 else s for i, s in enumerate(sort_reward_batch(prompts, responses))]
