"""Serve any reward of this project over HTTP on this machine, for `reward=remote reward.url=http://127.0.0.1:N`:

    python -m rewards.serve reward=geneval --port 8700
    python -m rewards.serve reward=pickscore reward.clip.dtype=bfloat16 --port 8701 --device cuda:1

The reward loads once (its own one-line errors first), then answers `POST /score` (images, prompts and metadata in,
scores and per-image info out; the wire format is in `rewards/remote.py`) and `GET /info`, one request at a time, in
batches of `--batch-size`. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch

from pipelines.errors import UserError, build, exit_on_user_error
from rewards.remote import decode_images, to_wire

logger = logging.getLogger("rewards.serve")


def load_reward(overrides: list[str]):
    """The reward a `reward=<name> reward.x=...` command line names, built as rl.run builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    if not any(o.startswith("reward=") for o in overrides):
        raise UserError("name the reward to serve: python -m rewards.serve reward=<name> --port N")
    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as error:
        raise UserError(str(error).splitlines()[0]) from None
    if cfg.reward._target_ == "rewards.remote.RemoteReward":
        raise UserError("reward=remote is the client; serve the reward it should reach (reward=<name>)")
    return build(OmegaConf.to_container(cfg.reward, resolve=True)), OmegaConf.to_container(cfg.reward)


def score_request(reward, images: torch.Tensor, body: dict, device: torch.device, batch_size: int) -> dict:
    prompts, metadata = list(body["prompts"]), body.get("metadata") or [{} for _ in body["prompts"]]
    scores, info = [], {}
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        with torch.no_grad():
            part, extra = reward(images[start:end].to(device), prompts[start:end], metadata[start:end])
        scores.append(part.cpu())
        for name, values in extra.items():
            if isinstance(values, torch.Tensor) and values.ndim == 1 and len(values) == len(part):
                info.setdefault(name, []).append(values.cpu())
    return {"scores": to_wire(torch.cat(scores)), "info": {k: to_wire(torch.cat(v)) for k, v in info.items()}}


def make_handler(reward, config: dict, device: torch.device, batch_size: int):
    class Handler(BaseHTTPRequestHandler):
        def answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/info":
                return self.answer(404, {"error": f"no such path {self.path}; use GET /info or POST /score"})
            self.answer(200, {"reward": config.get("_target_"), "config": config,
                              "differentiable": bool(reward.differentiable)})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self.answer(404, {"error": f"no such path {self.path}; use POST /score"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                missing = [key for key in ("images", "prompts") if key not in body]
                if missing:
                    raise ValueError(f"no {missing[0]!r} in the request")
                images = decode_images(body["images"])
            except (KeyError, ValueError, TypeError) as error:  # the request itself: the client's fault
                return self.answer(400, {"error": f"malformed request ({type(error).__name__}: {error})"})
            try:
                self.answer(200, score_request(reward, images, body, device, batch_size))
            except UserError as error:  # inputs the reward refuses (wrong prompts, shapes): said in one line
                self.answer(400, {"error": str(error)})
            except Exception as error:  # noqa: BLE001 (the server keeps serving; the client retries a 500)
                logger.exception("scoring failed")
                self.answer(500, {"error": f"{type(error).__name__}: {error}"})

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            logger.info("%s %s", self.address_string(), format % args)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) unless you mean otherwise")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass of the reward")
    parser.add_argument("overrides", nargs="*", help="reward=<name> and its options, as for rl.run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with exit_on_user_error():
        reward, config = load_reward(args.overrides)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        reward = reward.to(device)
        try:
            server = HTTPServer((args.host, args.port), make_handler(reward, config, device, args.batch_size))
        except OSError as error:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error})") from None
    print(f"serving {config.get('_target_')} on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
