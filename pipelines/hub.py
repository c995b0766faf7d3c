"""Checks that weights named by a Hugging Face hub id can be had, before anything heavy starts."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.errors import UserError


class ModelLoadError(UserError):
    """Weights cannot be loaded; the message (one line) says why and what to do."""


def check_hub_file(
    repo_id: str, filename: str | Sequence[str], use_local: str, revision: str | None = None
) -> None:
    """Pass if `filename` (or any of several) of hub repo `repo_id` is in the local cache, or the hub answers.

    Otherwise raise `ModelLoadError`; `use_local` completes its advice, e.g. "set model.path=DIR".
    """
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    filenames = [filename] if isinstance(filename, str) else list(filename)
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f, revision=revision), str) for f in filenames):
        return
    hint = f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and {use_local}"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        huggingface_hub.model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id} is gated: accept its licence on its hub page, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id} is neither a local folder nor a model on the Hugging Face hub") from None
    except Exception as error:  # network failures come as many types (httpx, OSError, timeouts)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub for {repo_id} ({reason}) and it is not in the local cache; {hint}"
        ) from None


def looks_like_hub_id(name: str) -> bool:
    """'org/name' (and not a relative path such as './x/y')."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
