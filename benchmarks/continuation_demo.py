"""Chunk continuation in a fixed-rate control loop: how far the executed actions jump where chunks meet.

    python benchmarks/continuation_demo.py [--episodes 30] [--train-steps 3000] [--seed 0]

A 2-D task that is multimodal wherever the robot is: go from x = -0.8 to x = 0.8 while weaving,
y = 0.3 sin(3 pi s + phi) with a random phase phi per demonstration. The observation is the current
position only, so at every point the demonstrations go on either upwards or downwards (two modes: the
situation in which independently sampled chunks disagree where they meet). An action chunk is the next
16 target positions, and the simulated robot reaches each target in one control tick. A factorized policy (K = 2 MLP components, soft router) is trained on the CPU and
sampled with DDIM, 10 steps, ``backend="torch"``.

The loop executes 8 actions per chunk. Sampling takes ``delay`` = 2 ticks: the next chunk is requested
2 ticks before the current one runs out, from the observation of that tick, and the robot keeps
executing the current chunk meanwhile (what :class:`fdp.AsyncSampler` does on a real robot; here the
delay is simulated, so the numbers do not depend on the machine's timing). The new chunk's first 2
actions are then already in the past, so execution starts at its action 2. Three ways to get the
new chunk:

- ``independent``: sample it from the observation alone (what a plain control loop does);
- ``continue-clean``: :func:`fdp.inpainting.continuation` fixes its first ``overlap`` actions to the
  actions of the current chunk the robot executes meanwhile (and, with overlap > delay, the next ones it
  had planned), with diffusion_policy's rule (the default);
- ``continue-noised``: the same with the RePaint-style rule (``inpaint="noised"``).

Reported per way, over all chunk boundaries of all episodes: the step the robot takes at the boundary
(the distance between consecutive executed positions), median and max, next to the median step inside
chunks; and the fraction of episodes that reach the goal region. Writes
benchmarks/results/continuation-demo-<date>.json and docs/img/continuation.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))

import fdp  # noqa: E402
from fdp.inpainting import continuation  # noqa: E402

HORIZON, ACTION_DIM, OBS_DIM = 16, 2, 2
TICKS = 40           # ticks of one demonstration from start to goal
START_X, GOAL_X = -0.8, 0.8
AMPLITUDE, CYCLES = 0.3, 1.5
NOISE = 0.01
EXECUTE = 8          # actions executed per chunk
DELAY = 2            # sampling latency, in control ticks


def demo_path(phase: float, n: int = TICKS) -> torch.Tensor:
    """Positions [n + 1, 2] of a demonstration with phase ``phase``."""
    s = torch.linspace(0.0, 1.0, n + 1)
    x = START_X + (GOAL_X - START_X) * s
    y = AMPLITUDE * torch.sin(2 * math.pi * CYCLES * s + phase)
    return torch.stack((x, y), -1)


def future(path: torch.Tensor, t: int) -> torch.Tensor:
    """The next HORIZON positions after tick t (the goal repeated past the end)."""
    idx = torch.clamp(torch.arange(t + 1, t + 1 + HORIZON), max=path.shape[0] - 1)
    return path[idx]


def observation(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    return cur.clone()  # the current position only: the direction of motion is not observed


def make_batch(B: int, g: torch.Generator):
    phases = 2 * math.pi * torch.rand(B, generator=g)
    ts = torch.randint(0, TICKS + 1, (B,), generator=g)
    obs, act = [], []
    for phase, t in zip(phases.tolist(), ts.tolist()):
        path = demo_path(phase) + NOISE * torch.randn(TICKS + 1, 2, generator=g)
        obs.append(observation(path[max(t - 1, 0)], path[t]))
        act.append(future(path, t))
    return torch.stack(act), torch.stack(obs)


def train(steps: int, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    comps = [fdp.MLPDenoiser(ACTION_DIM, HORIZON, global_cond_dim=OBS_DIM, hidden_dim=128, num_blocks=2)
             for _ in range(2)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(OBS_DIM, 2, hidden_dim=32), HORIZON, ACTION_DIM)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        actions, obs = make_batch(256, g)
        loss = policy.loss(actions, obs, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return policy.eval()


def episode(sampler, mode: str, overlap: int, g: torch.Generator):
    """One episode; returns (executed positions [n, 2], tick indices where a new chunk took over)."""
    start_y = AMPLITUDE * math.sin(2 * math.pi * float(torch.rand((), generator=g)))
    pos = [torch.tensor([START_X, start_y])] * 2  # previous and current
    executed = [pos[-1]]
    boundaries = []
    obs_tick = 0
    chunk = sampler(observation(pos[-2], pos[-1])[None], generator=g)[0]
    start = 0  # index of the chunk's next action
    tick = 0
    while tick < TICKS + 8:
        # Request the next chunk DELAY ticks before this one runs out, from this tick's observation.
        req_tick = tick + EXECUTE - DELAY
        for _ in range(EXECUTE - DELAY):
            pos = [pos[-1], chunk[start]]
            executed.append(pos[-1])
            start, tick = start + 1, tick + 1
        obs = observation(pos[-2], pos[-1])[None]
        kwargs = {}
        if mode != "independent":
            known, mask = continuation(chunk[None], executed=req_tick - obs_tick, overlap=overlap)
            kwargs = dict(known=known, known_mask=mask, inpaint="noised" if mode == "continue-noised" else "clean")
        new = sampler(obs, generator=g, **kwargs)[0]
        # The robot keeps executing the current chunk while the new one is sampled.
        for _ in range(DELAY):
            pos = [pos[-1], chunk[start]]
            executed.append(pos[-1])
            start, tick = start + 1, tick + 1
        chunk, obs_tick, start = new, req_tick, DELAY
        boundaries.append(len(executed))  # the next executed position is the new chunk's first
    return torch.stack(executed), boundaries


def run(args):
    print(f"[continuation demo] training ({args.train_steps} steps, CPU)", flush=True)
    policy = train(args.train_steps, args.seed)
    sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sampler = fdp.Sampler(policy, sched, num_inference_steps=10, backend="torch")
    modes = [("independent", 0), ("continue-clean", DELAY), ("continue-clean", DELAY + 4),
             ("continue-noised", DELAY + 4)]
    results, trajectories = [], {}
    for mode, overlap in modes:
        g = torch.Generator().manual_seed(args.seed + 100)
        jumps, inside, reached, trajs = [], [], 0, []
        for _ in range(args.episodes):
            x, bounds = episode(sampler, mode, overlap, g)
            steps = (x[1:] - x[:-1]).norm(dim=-1)  # steps[i]: from executed[i] to executed[i + 1]
            b = set(i - 1 for i in bounds if i < len(x))
            jumps += [float(steps[i]) for i in sorted(b)]
            inside += [float(steps[i]) for i in range(len(steps)) if i not in b]
            reached += int(abs(float(x[-1, 0]) - GOAL_X) < 0.1)
            trajs.append((x, bounds))
        jt, it = torch.tensor(jumps), torch.tensor(inside)
        row = dict(mode=mode, overlap=overlap, boundaries=len(jumps), boundary_step_median=round(float(jt.median()), 4),
                   boundary_step_max=round(float(jt.max()), 4), inside_step_median=round(float(it.median()), 4),
                   inside_step_max=round(float(it.max()), 4), reached_goal=f"{reached}/{args.episodes}")
        print(f"  {mode:<16} overlap {overlap}: boundary step median {row['boundary_step_median']:.4f}, max "
              f"{row['boundary_step_max']:.4f}; inside chunks median {row['inside_step_median']:.4f}, max "
              f"{row['inside_step_max']:.4f}; reached goal {row['reached_goal']}", flush=True)
        results.append(row)
        trajectories[(mode, overlap)] = trajs
    return results, trajectories


def plot(trajectories, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("independent", 0), ("continue-clean", DELAY), ("continue-clean", DELAY + 4)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 9.5), sharex=True)
    for ax, key in zip(axes, keys):
        row = next(r for r in results if (r["mode"], r["overlap"]) == key)
        ax.text(0.01, 0.02, f"step at chunk boundaries: median {row['boundary_step_median']:.3f}, max "
                f"{row['boundary_step_max']:.3f} (inside chunks: median {row['inside_step_median']:.3f})",
                transform=ax.transAxes, fontsize=8)
        for n, (x, bounds) in enumerate(trajectories[key][:4]):
            ax.plot(x[:, 0], x[:, 1], "-", lw=1, color=f"C{n}", alpha=0.8)
            b = [i for i in bounds if i < len(x)]
            ax.plot(x[[i - 1 for i in b], 0], x[[i - 1 for i in b], 1], "o", ms=3, color=f"C{n}")
            ax.plot(x[b, 0], x[b, 1], "x", ms=5, color=f"C{n}")
        ax.set_title(f"{key[0]}" + (f" (overlap {key[1]})" if key[1] else "") +
                     ": executed positions\n(o last action of a chunk, x first of the next)", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-0.85, 0.85)
        ax.set_ylim(-0.45, 0.45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=os.path.join(REPO, "docs", "img", "continuation.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results, trajectories = run(args)
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot(trajectories, results, args.plot)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"continuation-demo-{date}.json")
    record = dict(command=" ".join(["python", "benchmarks/continuation_demo.py", *(argv or sys.argv[1:])]),
                  date=date, machine=f"CPU, torch {torch.__version__}, 1 thread", seconds=round(time.perf_counter() - t0),
                  execute=EXECUTE, delay=DELAY, horizon=HORIZON, episodes=args.episodes, train_steps=args.train_steps,
                  seed=args.seed, results=results, plot=os.path.relpath(args.plot, REPO))
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
