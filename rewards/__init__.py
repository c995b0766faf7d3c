"""Reward models behind one contract: `reward(images, prompts, metadata) -> (scores, info)`; see `rewards/base.py`.

Each reward lives in its own module and is configured by `conf/reward/<name>.yaml`; heavy imports stay inside the
modules, so importing this package is cheap.
"""

from rewards.base import Reward, RewardInputError, check_reward_inputs

__all__ = ["Reward", "RewardInputError", "check_reward_inputs"]
