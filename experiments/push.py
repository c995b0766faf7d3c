"""Upload a run's `final/` (the LoRA in both layouts or the full pipeline, `README.md` model card, `samples.png`) to
the Hugging Face hub.

    python -m experiments.push RUN_DIR --repo USER/NAME [--private]

It needs a token (`hf auth login`, or `HF_TOKEN`) and the network; without either it says so in one line and uploads
nothing. A run whose `final/` has no model card (finished before cards were written) gets one first
(rl/model_card.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserError, exit_on_user_error
from pipelines.hub import looks_like_hub_id


class PushError(UserError):
    """The run cannot be uploaded; the message (one line) says why."""


def check_final(run_dir: Path) -> Path:
    final = run_dir / "final"
    if not final.is_dir():
        raise PushError(f"{run_dir} has no final/ folder: only a finished training run can be pushed")
    if not (final / "pytorch_lora_weights.safetensors").exists() and not (final / "model_index.json").exists():
        raise PushError(f"{final} holds neither a LoRA (pytorch_lora_weights.safetensors) nor a pipeline "
                        f"(model_index.json)")
    if not (final / "README.md").exists():
        from omegaconf import OmegaConf

        from rl.model_card import write_model_card

        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        write_model_card(run_dir, config)
    return final


def hub_access() -> str:
    """The token to upload with, once the hub has answered for it; `PushError` when there is none or no network."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the network (unset it where the hub is reachable)")
    token = huggingface_hub.get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN) with a token that can write")
    try:
        huggingface_hub.whoami(token=token)
    except Exception as error:  # network failures come as many types (httpx, OSError, timeouts); a bad token as 401
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PushError(f"the Hugging Face hub does not answer for this token ({reason}); "
                        f"nothing was uploaded") from None
    return token


def push(run_dir: Path, repo: str, private: bool = False) -> str:
    """Create `repo` (if needed) and upload `run_dir/final` into it; return the repository's URL."""
    if not looks_like_hub_id(repo):
        raise PushError(f"--repo {repo} is not a hub repository id of the form USER/NAME")
    final = check_final(run_dir)
    token = hub_access()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(final), repo_id=repo, commit_message=f"sd3-rl: {run_dir.name}/final")
    except Exception as error:  # a read-only token (403), a repository of someone else, a dropped connection
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PushError(f"uploading to {repo} failed ({reason})") from None
    return str(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repo", required=True, help="USER/NAME on the hub (created if it does not exist)")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        print(f"uploaded {args.run_dir / 'final'} to {push(args.run_dir, args.repo, args.private)}")


if __name__ == "__main__":
    main()
