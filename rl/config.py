"""Building objects from Hydra configs, with the user's input errors kept readable."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from pipelines.hub import ModelLoadError
from rewards.base import RewardInputError
from rl.data import DataError
from rl.prompts import PromptSetError



class ConfigError(ValueError):
    """A configuration value is invalid or two values contradict each other; the message names the option."""


# Errors caused by the user's input (a missing file, offline weights, a bad value): reported in one line.
USER_ERRORS: tuple[type[Exception], ...] = (ModelLoadError, PromptSetError, RewardInputError, DataError, ConfigError)


def build(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that a user error raised by any (nested) target reaches the caller as itself
    rather than wrapped in Hydra's `InstantiationException`, so that it can be reported in one line."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        raise
