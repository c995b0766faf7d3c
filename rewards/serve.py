"""Serve any reward of this project over HTTP on this machine, for `reward=remote reward.url=http://127.0.0.1:N`:

    python -m rewards.serve reward=geneval --port 8700
    python -m rewards.serve reward=pickscore reward.clip.dtype=bfloat16 --port 8701 --device cuda:1

The reward loads once (its own one-line errors first), then answers `POST /score` (images, prompts and metadata in,
scores and per-image info out; the wire format is in `rewards/remote.py`) and `GET /info`, in batches of
`--batch-size`. Each connection has its own thread, so a slow or stalled client never holds up another (a socket that
sends nothing for `--timeout` seconds is closed); the reward itself scores one request at a time (models are not
thread-safe and share the GPU's memory). Requests over `--max-request-mb` are refused before their body is read, and
every field is checked before the reward sees it: the client's mistakes get 400 (or 408, 411, 413, 404, 405) with a
one-line JSON `{"error": ...}`, which `RemoteReward` reports without retrying; only a failure inside the reward
gets 500. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import binascii
import io
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from pipelines.configs import build
from pipelines.errors import UserError, exit_on_user_error
from rewards.base import check_reward_inputs
from rewards.remote import to_wire

logger = logging.getLogger("rewards.serve")

# A request of the client's default 32 images at SD3's native 1024 px is 512 MiB: 32 x 3 x 1024 x 1024 float32 is
# 384 MiB, and base64 (the wire format) makes 4 bytes of every 3. Twice that leaves room for larger batches; reading
# one holds about twice its size in memory at the peak (the JSON text and the base64 string parsed from it).
DEFAULT_MAX_REQUEST_MB = 1024
DEFAULT_TIMEOUT = 30.0
ROUTES = {"/info": "GET", "/score": "POST"}  # path -> the one method it answers


class RequestError(UserError):
    """A request refused for the client's mistake: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def bad_request(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, f"malformed request: {message}")


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def parse_json(text: str) -> object:
    try:
        return json.loads(text)
    except RecursionError:  # the C parser's depth guard: `[[[[...` thousands deep
        raise bad_request("the JSON is nested too deeply") from None
    except ValueError as error:
        raise bad_request(f"the body is not JSON ({one_line(error)[:200]})") from None


def base64_field(text: object) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"'images' must be a base64 string of a .npy array, got {type(text).__name__}")
    try:
        return binascii.a2b_base64(text, strict_mode=True)  # reads an ASCII str in place: no copy of the text
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"'images' is not base64 ({one_line(error)[:200]})") from None


def read_images(data: bytes) -> torch.Tensor:
    """A float32 NCHW array in `numpy.save`'s format. Its header is checked (dtype, rank, and a size that matches the
    data) before anything is allocated, so a few bytes cannot claim gigabytes."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(buffer)
    except (ValueError, EOFError, SyntaxError, TypeError) as error:
        raise bad_request(f"'images' is not a .npy array ({one_line(error)[:200]})") from None
    if dtype != np.float32:
        raise bad_request(f"images must be float32, got {dtype}")
    if len(shape) != 4 or shape[1] != 3:
        rank = "a 0-d array" if not shape else f"shape {tuple(shape)}"
        raise bad_request(f"images must be an NCHW array with 3 channels, got {rank}")
    if shape[0] == 0:
        raise bad_request("the batch of images is empty")
    if min(shape) <= 0:
        raise bad_request(f"images must have a positive height and width, got shape {tuple(shape)}")
    expected, got = math.prod(shape) * dtype.itemsize, len(data) - buffer.tell()
    if got != expected:
        raise bad_request(f"the array of shape {tuple(shape)} needs {expected} bytes, got {got}")
    array = np.frombuffer(data, dtype=dtype, offset=buffer.tell())
    array = array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)
    return torch.from_numpy(array.copy())  # writable (torch wants it), and the request's bytes can go


def parse_score_request(body: object) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The images, prompts and metadata of a `POST /score` body, or `RequestError` (400) naming what is wrong."""
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    missing = [key for key in ("images", "prompts") if key not in body]
    if missing:
        raise bad_request(f"no {missing[0]!r} in the request")
    prompts, metadata = body["prompts"], body.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise bad_request("'prompts' must be a list of strings, one per image")
    if metadata is not None and (not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata)):
        raise bad_request("'metadata' must be a list of objects, one per image, or null")
    images = read_images(base64_field(body.pop("images")))  # popped: the base64 text is freed once decoded
    if len(prompts) != len(images) or (metadata is not None and len(metadata) != len(images)):
        counts = f"{len(prompts)} prompts" + ("" if metadata is None else f" and {len(metadata)} metadata entries")
        raise bad_request(f"got {counts} for {len(images)} images; send one of each per image")
    try:
        check_reward_inputs(images, prompts, metadata)  # values: NaN, outside [0, 1]
    except UserError as error:
        raise bad_request(str(error)) from None
    return images, prompts, metadata if metadata is not None else [{} for _ in prompts]


def score_request(reward, images: torch.Tensor, prompts: list[str], metadata: list[dict], device: torch.device,
                  batch_size: int) -> dict:
    """Scores and per-image info of the whole request, in forward passes of `batch_size` images."""
    scores, info = [], {}
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        with torch.no_grad():
            part, extra = reward(images[start:end].to(device), prompts[start:end], metadata[start:end])
        if part.shape != (end - start,):
            raise RuntimeError(f"the reward returned scores of shape {tuple(part.shape)} for {end - start} images")
        scores.append(part.cpu())
        for name, values in extra.items():
            if isinstance(values, torch.Tensor) and values.ndim == 1 and len(values) == len(part):
                info.setdefault(name, []).append(values.cpu())
    return {"scores": to_wire(torch.cat(scores)), "info": {k: to_wire(torch.cat(v)) for k, v in info.items()}}


class RewardServer(ThreadingHTTPServer):
    """One daemon thread per connection; `scoring` lets one request at a time reach the reward."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], reward, config: dict, device: torch.device, batch_size: int = 32,
                 timeout: float = DEFAULT_TIMEOUT, max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20):
        self.reward, self.config, self.device, self.batch_size = reward, config, device, batch_size
        self.read_timeout, self.max_request_bytes = timeout, max_request_bytes
        self.scoring = threading.Lock()
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # StreamRequestHandler sets it on the socket: every read and write
        self.body_unread = False
        super().setup()

    def answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code >= 400:
            self.send_header("Connection", "close")
        if code == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", ROUTES[urlsplit(self.path).path])
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def refuse(self, code: int, message: str) -> None:
        self.answer(code, {"error": one_line(message)})

    def send_error(self, code, message=None, explain=None):  # http.server's own refusals (431, 501, ...), as JSON
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.refuse(code, message or HTTPStatus(code).phrase)

    def parse_request(self) -> bool:
        try:
            return super().parse_request()
        except TimeoutError:  # the headers stopped coming
            self.close_connection = True
            self.refuse(HTTPStatus.REQUEST_TIMEOUT, f"no data for {self.timeout:g} s while reading the headers")
            return False

    def route(self) -> None:
        path = urlsplit(self.path).path
        self.body_unread = self.headers.get("Content-Length", "0").strip() not in ("", "0") or (
            "Transfer-Encoding" in self.headers)
        if path not in ROUTES:
            return self.refuse(HTTPStatus.NOT_FOUND, f"no such path {path}; use GET /info or POST /score")
        if self.command != ROUTES[path]:
            return self.refuse(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} answers {ROUTES[path]} only, not {self.command}")
        if path == "/info":
            reward = self.server.reward
            return self.answer(200, {"reward": self.server.config.get("_target_"), "config": self.server.config,
                                     "differentiable": bool(reward.differentiable),
                                     "max_request_bytes": self.server.max_request_bytes})
        try:
            images, prompts, metadata = parse_score_request(parse_json(self.read_body()))
        except RequestError as error:
            return self.refuse(error.status, str(error))
        try:
            with self.server.scoring:
                result = score_request(self.server.reward, images, prompts, metadata, self.server.device,
                                       self.server.batch_size)
        except UserError as error:  # inputs the reward refuses (prompts it cannot score): said in one line
            return self.refuse(HTTPStatus.BAD_REQUEST, str(error))
        except Exception as error:  # the server keeps serving; the client retries a 500
            logger.exception("scoring failed")
            return self.refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        self.answer(200, result)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = route  # every method: 405 or 404 says why

    def read_body(self) -> str:
        """The body of `Content-Length` bytes as text (JSON travels as UTF-8), refused (413) before any of it is read
        when over the bound."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (no chunked bodies)")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "no Content-Length: send the body with its length")
        if len(set(lengths)) > 1 or not re.fullmatch(r"[0-9]+", lengths[0].strip()):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {', '.join(lengths)[:50]!r}")
        size, bound = int(lengths[0]), self.server.max_request_bytes
        if size > bound:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the request is {size / 2**20:.1f} MiB, over this server's --max-request-mb of "
                               f"{bound / 2**20:g}: send fewer images per request (reward.batch_size)")
        try:
            data = self.rfile.read(size)
        except TimeoutError:
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT,
                               f"no data for {self.timeout:g} s while reading the body; "
                               f"the connection is closed") from None
        self.body_unread = False
        if len(data) < size:
            raise bad_request(f"the body ended after {len(data)} of its {size} bytes")
        try:
            return data.decode()  # and the bytes go: the text is all that is parsed
        except UnicodeDecodeError as error:
            raise bad_request(f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None

    def finish(self) -> None:
        """Close gracefully after an answer sent before the body was read (404, 405, 411, 413): a peer still
        sending would otherwise get a reset that can destroy the answer before it reads it. What comes meanwhile
        is discarded, for at most a second."""
        try:
            super().finish()
            if self.body_unread:
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 1.0
                self.connection.settimeout(0.2)
                while time.monotonic() < deadline and self.connection.recv(1 << 16):
                    pass
        except OSError:  # the peer is gone: nothing to close gracefully
            pass

    def log_message(self, format, *args):  # http.server's signature
        logger.info("%s %s", self.address_string(), format % args)


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


def positive(kind):
    """An argparse type: a finite number above 0 of `kind`."""

    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) unless you mean otherwise")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="images per forward pass of the reward")
    parser.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT,
                        help="seconds a connection may send nothing before it is closed")
    parser.add_argument("--max-request-mb", type=positive(float), default=DEFAULT_MAX_REQUEST_MB,
                        help="largest request in MiB (32 images of 1024 px are 512), refused with 413 before reading")
    parser.add_argument("overrides", nargs="*", help="reward=<name> and its options, as for rl.run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with exit_on_user_error():
        reward, config = load_reward(args.overrides)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        reward = reward.to(device)
        try:
            server = RewardServer((args.host, args.port), reward, config, device, args.batch_size, args.timeout,
                                  int(args.max_request_mb * 2**20))
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
