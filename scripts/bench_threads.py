"""How many torch threads a CPU run should use: one GRPO-sized unit of work (SDE sampling plus LoRA training forwards
and backwards in the digits world) timed at several thread counts, on an idle machine and beside a competing process.

    python -m scripts.bench_threads                      # threads 1 and all cores, idle and beside one competitor
    python -m scripts.bench_threads --threads 1 2 4 --repeats 5 --wait default spin:1000

Each configuration runs in a fresh process (OpenMP reads its settings once, at start); the competitor is another
process doing the same work in a loop with the default thread count, as a second job on a shared machine would. It
prints seconds per unit and every time as a ratio to one thread on the idle machine, all measured in this one run.
The defaults of `rl/threads.py` (`cpu_threads=auto`, `GOMP_SPINCOUNT=1000`) were chosen from its output;
docs/performance.md quotes one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit_of_work(pipe, transformer, optimizer) -> None:
    """16 images x 10 SDE steps, then 8 training forwards and backwards of 16 samples (a small GRPO epoch)."""
    import torch

    prompts = ["a photo of the number seven"] * 16
    with torch.no_grad():  # the sampling and the text encoders are not trained
        latents = pipe(prompts, num_inference_steps=10, guidance_scale=4.5, noise_level=0.7, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
    for _ in range(8):
        prediction = transformer(hidden_states=latents, timestep=torch.full((16,), 500.0), encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)[0]
        prediction.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def worker(repeats: int, forever: bool) -> None:
    """Load the digits world's model with a LoRA, warm up, then time `repeats` units (or loop until killed)."""
    import torch

    from pipelines.digits import load_digits_pipeline
    from rl.lora import LoraSpec, add_transformer_lora

    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    add_transformer_lora(pipe.transformer, LoraSpec(rank=8))
    optimizer = torch.optim.AdamW([p for p in pipe.transformer.parameters() if p.requires_grad], lr=1e-4)
    unit_of_work(pipe, pipe.transformer, optimizer)  # warm-up
    if forever:
        print("ready", flush=True)
        while True:
            unit_of_work(pipe, pipe.transformer, optimizer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unit_of_work(pipe, pipe.transformer, optimizer)
        times.append(time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": sorted(times)[len(times) // 2]}), flush=True)


def wait_env(policy: str) -> dict[str, str]:
    """OpenMP's waiting between parallel regions: `default` (spin a while, then sleep), `PASSIVE` (sleep at once),
    `ACTIVE` (spin), or `spin:N` (GNU OpenMP's GOMP_SPINCOUNT=N spins before sleeping)."""
    if policy == "default":
        return {}
    if policy.startswith("spin:"):
        return {"GOMP_SPINCOUNT": policy[len("spin:"):]}
    return {"OMP_WAIT_POLICY": policy}


def clean_env() -> dict[str, str]:
    """This environment without the settings each configuration chooses."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def run_config(threads: int, repeats: int, policy: str) -> float:
    env = {**clean_env(), "OMP_NUM_THREADS": str(threads), **wait_env(policy)}
    out = subprocess.run([sys.executable, "-m", "scripts.bench_threads", "--worker", "--repeats", str(repeats)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def start_competitor() -> subprocess.Popen:
    env = clean_env()  # torch's defaults, as a second job started without this project's settings
    process = subprocess.Popen([sys.executable, "-m", "scripts.bench_threads", "--worker", "--forever"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    process.stdout.readline()  # "ready": loaded and warmed up
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed units per configuration (the median is kept)")
    parser.add_argument("--wait", nargs="+", default=["default", "PASSIVE", "spin:10000", "spin:1000"],
                        help="OpenMP wait policies to try with more than one thread: default, PASSIVE, ACTIVE, spin:N")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats, args.forever)
        return
    cores = len(os.sched_getaffinity(0))
    counts = args.threads or sorted({1, cores})
    configs = [(n, policy) for n in counts for policy in (args.wait if n > 1 else ["default"])]
    results = {}
    for condition in ("idle", "beside one competitor"):
        competitor = start_competitor() if condition != "idle" else None
        try:
            for threads, policy in configs:
                results[(condition, threads, policy)] = run_config(threads, args.repeats, policy)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    base = results[("idle", counts[0], configs[0][1])]
    print(f"{cores} cores; one unit = 16 images x 10 SDE steps + 8 training forwards/backwards (digits world)")
    print(f"{'condition':<24} {'threads':>7} {'wait policy':>11} {'s / unit':>9} {'ratio':>6}")
    for (condition, threads, policy), seconds in results.items():
        print(f"{condition:<24} {threads:>7} {policy:>11} {seconds:>9.2f} {seconds / base:>6.2f}")
    print(f"(ratio: time / time of {counts[0]} thread(s) on the idle machine)")


if __name__ == "__main__":
    main()
