"""``fdp demo``: train a small factorized policy on a multimodal multitask 2-D task set.

Four tasks, each "move from the origin to a goal, around an obstacle on the
left or on the right": every task has two modes (the two detours), so a
policy that averages them fails. The observation is the task's one-hot id.
The demo trains K = 4 ``MLPDenoiser`` components and a soft router with the
paper's DDPM settings, samples with DDIM through ``fdp.Sampler``, and reports
per task how many samples land on a mode, how they split between the two
modes, and which component the router leans on; it writes a PNG of the
samples.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HORIZON = 16
ACTION_DIM = 2
TASKS = ("right", "up", "left", "down")
DETOUR = 0.35        # lateral size of the detour around the obstacle
GOAL_DISTANCE = 0.8  # keeps every point inside the scheduler's clip range [-1, 1]
NOISE = 0.02
ON_MODE_RMS = 0.1    # a sample within this RMS distance of a mode's path is "on" it
SAME_WEIGHTS = 0.05  # tasks whose router weights all lie this close share one routing


def mode_paths() -> torch.Tensor:
    """The mean path of every (task, mode): ``[num_tasks, 2, HORIZON, 2]``."""
    s = torch.linspace(0.0, 1.0, HORIZON)
    paths = torch.empty(len(TASKS), 2, HORIZON, 2)
    for i in range(len(TASKS)):
        ang = i * math.pi / 2
        d = torch.tensor([math.cos(ang), math.sin(ang)])
        n = torch.tensor([-math.sin(ang), math.cos(ang)])
        for m, side in enumerate((1.0, -1.0)):
            paths[i, m] = GOAL_DISTANCE * s[:, None] * d + side * DETOUR * torch.sin(math.pi * s)[:, None] * n
    return paths


def make_batch(batch: int, generator: torch.Generator, tasks=None):
    """Random (actions ``[B, H, 2]``, one-hot task ``[B, T]``, task ids, mode ids), drawn
    from the task indices ``tasks`` (default: all)."""
    paths = mode_paths()
    pool = torch.arange(len(TASKS)) if tasks is None else torch.as_tensor(tasks)
    task = pool[torch.randint(0, len(pool), (batch,), generator=generator)]
    mode = torch.randint(0, 2, (batch,), generator=generator)
    actions = paths[task, mode] + NOISE * torch.randn(batch, HORIZON, ACTION_DIM, generator=generator)
    cond = torch.nn.functional.one_hot(task, len(TASKS)).float()
    return actions, cond, task, mode


@dataclass
class TaskReport:
    task: str
    on_mode: float            # fraction of samples within ON_MODE_RMS of either mode
    mode_split: tuple         # fraction of on-mode samples on each mode
    weights: list             # mean router weight of every component
    dominant: int


def evaluate(samples: torch.Tensor, weights: torch.Tensor) -> TaskReport:
    """Score samples ``[T, N, H, 2]`` (per task) and router weights ``[T, K]``."""
    paths = mode_paths()
    reports = []
    for i, name in enumerate(TASKS):
        rms = ((samples[i, :, None] - paths[i][None]) ** 2).sum(-1).mean(-1).sqrt()  # [N, 2]
        best, which = rms.min(dim=1)
        on = best < ON_MODE_RMS
        n_on = int(on.sum())
        split = tuple(float((which[on] == m).sum()) / max(n_on, 1) for m in range(2))
        w = weights[i].tolist()
        reports.append(TaskReport(name, n_on / samples.shape[1], split, w, int(weights[i].argmax())))
    return reports


def plot(samples: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = mode_paths()
    fig, ax = plt.subplots(figsize=(6, 6))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for i, name in enumerate(TASKS):
        for traj in samples[i][:60]:
            ax.plot(traj[:, 0], traj[:, 1], color=colors[i], alpha=0.25, lw=1)
        for m in range(2):
            ax.plot(paths[i, m, :, 0], paths[i, m, :, 1], color="k", ls="--", lw=1)
        ax.plot([], [], color=colors[i], label=f"task '{name}'")
    ax.plot([], [], color="k", ls="--", label="the two modes of each task")
    ax.set_aspect("equal")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("fdp demo: sampled action chunks (DDIM, 10 steps)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TRAIN_STEPS = 2000
QUICK_TRAIN_STEPS = 40
QUICK_SAMPLES_PER_TASK = 40


def run(out_dir: str = "fdp-demo", train_steps: int | None = None, batch_size: int = 256, seed: int = 0,
        samples_per_task: int | None = None, backend: str = "auto", progress: bool = True,
        quick: bool = False, component_weight: float = 0.0, balance_weight: float = 0.0) -> dict:
    """Train, sample, evaluate and plot; returns the report as a dict (also saved as JSON).

    ``train_steps`` defaults to :data:`TRAIN_STEPS`, ``samples_per_task`` to
    200; ``quick`` lowers both to a smoke run that checks the pipeline, not
    the result. Prints what it is doing at each stage. ``component_weight``
    and ``balance_weight`` go to :meth:`fdp.FactorizedPolicy.loss` (0, 0: the
    paper's loss); ``"routing"`` in the result is :func:`fdp.diagnostics.routing`
    on a fresh batch of demonstrations per task.
    """
    from ._optional import require
    from .backends import get_backend
    from ._validation import check_bool, check_int, check_number, check_optional_int, check_output_path

    # Every argument is checked here, before minutes of training.
    check_output_path("out_dir", out_dir, folder=True)
    train_steps = check_optional_int("train_steps", train_steps, min_value=1)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    seed = check_int("seed", seed, min_value=0)
    samples_per_task = check_optional_int("samples_per_task", samples_per_task, min_value=1)
    progress, quick = check_bool("progress", progress), check_bool("quick", quick)
    component_weight = check_number("component_weight", component_weight, low=0)
    balance_weight = check_number("balance_weight", balance_weight, low=0)
    if backend != "auto":
        get_backend(backend)  # an unknown name, named
    require("matplotlib", "demo", "fdp demo's plot")  # fail now, not after training
    if train_steps is None:
        train_steps = QUICK_TRAIN_STEPS if quick else TRAIN_STEPS
    if samples_per_task is None:
        samples_per_task = QUICK_SAMPLES_PER_TASK if quick else 200
    # The demo's tensors are small: more intra-op threads only wait on each
    # other (measured: 1 thread ~25 CPU-ms per training step, 2 threads on a
    # busy 2-core machine ~600), so it runs on one and restores the setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, train_steps, batch_size, seed, samples_per_task, backend, progress, quick,
                    component_weight, balance_weight)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, train_steps, batch_size, seed, samples_per_task, backend, progress, quick, component_weight,
         balance_weight) -> dict:
    import fdp

    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is a nicety, not a requirement
        tqdm = None

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    K, Dc = 4, len(TASKS)
    components = [fdp.MLPDenoiser(ACTION_DIM, HORIZON, global_cond_dim=Dc, hidden_dim=128, num_blocks=2)
                  for _ in range(K)]
    router = fdp.Router(Dc, K, hidden_dim=32, strategy="soft")
    policy = fdp.FactorizedPolicy(components, router, HORIZON, ACTION_DIM)
    scheduler = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                  clip_sample=True, prediction_type="epsilon")
    # A backend named explicitly is resolved now, so that one that cannot run here fails before training
    # (the Sampler repacks the trained weights by itself); "auto" picks for the trained policy.
    sampler = None if backend == "auto" else fdp.Sampler(policy, scheduler, num_inference_steps=10, backend=backend)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3, weight_decay=1e-4)
    sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train_steps)

    print(f"[fdp demo] {'quick run: ' if quick else ''}training K={K} MLP components and a soft router on "
          f"{len(TASKS)} tasks x 2 modes, {train_steps} steps of batch {batch_size} on the CPU", flush=True)
    t0 = time.perf_counter()
    use_bar = tqdm is not None and progress
    bar = tqdm(range(train_steps), desc="training", unit="step") if use_bar else range(train_steps)
    every = max(1, train_steps // 10)
    ema = None
    for step in bar:
        actions, cond, _, _ = make_batch(batch_size, gen)
        loss = policy.loss(actions, cond, generator=gen, component_weight=component_weight,
                           balance_weight=balance_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched_lr.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if use_bar and step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
        elif progress and not use_bar and (step + 1) % every == 0:
            print(f"[fdp demo]   step {step + 1}/{train_steps}, loss {ema:.4f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    train_s = time.perf_counter() - t0

    policy.eval()
    print(f"[fdp demo] choosing a sampling backend ('{backend}': each candidate checked against eager torch"
          f"{' and timed' if backend == 'auto' else ''})", flush=True)
    t0 = time.perf_counter()
    if sampler is None:
        sampler = fdp.Sampler(policy, scheduler, num_inference_steps=10, backend=backend)
    choose_s = time.perf_counter() - t0
    eager = fdp.Sampler(policy, scheduler, num_inference_steps=10, backend="torch")
    print(f"[fdp demo] sampling {samples_per_task} action chunks per task (DDIM, 10 steps, backend "
          f"'{sampler.backend}'), and timing it against eager torch", flush=True)
    cond = torch.eye(Dc).repeat_interleave(samples_per_task, dim=0)
    with torch.no_grad():
        actions = sampler(cond, generator=torch.Generator().manual_seed(seed + 1))
        reference = eager(cond, generator=torch.Generator().manual_seed(seed + 1))
        weights = policy.weights(torch.eye(Dc))
    timing = {"choose_seconds": round(choose_s, 2),
              "agreement": fdp.tolerances.rel_error(actions, reference),
              "batches": [_time_both(eager, sampler, cond[::samples_per_task][:1], seed, quick),
                          _time_both(eager, sampler, cond, seed, quick)]}
    demo_actions, demo_cond, demo_task, _ = make_batch(samples_per_task * Dc, gen)
    routing = fdp.diagnostics.routing(policy, {n: demo_cond[demo_task == i] for i, n in enumerate(TASKS)},
                                      {n: demo_actions[demo_task == i] for i, n in enumerate(TASKS)}, generator=gen)
    samples = actions.reshape(Dc, samples_per_task, HORIZON, ACTION_DIM)
    reports = evaluate(samples, weights)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "samples.png"
    print(f"[fdp demo] writing {png}", flush=True)
    plot(samples, png)
    result = {
        "train_steps": train_steps, "train_seconds": round(train_s, 2), "final_loss": ema, "quick": quick,
        "sampler_backend": sampler.backend, "selection": str(sampler.selection), "timing": timing,
        "tasks": [r.__dict__ for r in reports], "routing": routing, "plot": str(png),
    }
    (out / "report.json").write_text(json.dumps(result, indent=2))
    return result


def _time_both(eager, sampler, cond, seed, quick) -> dict:
    """Median wall time of the same sampling call with eager torch and with ``sampler``'s backend (the bench's
    timing loop: a warm-up call, then calls until the repeats or the time budget run out)."""
    from .bench.timing import measure, summarize

    def timer(s):
        def call(_):
            with torch.no_grad():
                return s(cond, generator=torch.Generator().manual_seed(seed + 1))
        m = measure(call, "cpu", n_sets=1, repeats=3 if quick else 20, warmup=1, budget_s=0.5 if quick else 2.0,
                    min_repeats=3)
        return summarize(m.call_wall_us)

    row = {"batch": int(cond.shape[0]), "eager_us": timer(eager), "picked_us": timer(sampler)}
    row["speedup"] = row["eager_us"]["median"] / row["picked_us"]["median"]
    return row


def _ms(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us < 1e5 else f"{us / 1e6:.2f} s"


def print_report(result: dict) -> None:
    print(f"\ntrained {result['train_steps']} steps in {result['train_seconds']} s "
          f"(final loss {result['final_loss']:.4f})")
    t = result["timing"]
    name = result["sampler_backend"]
    print(f"\nsampling speed on this CPU (DDIM, 10 steps; median wall time per call, the same samples):\n"
          f"{'chunks per call':>16}{'eager torch':>14}{name:>16}{'speedup':>10}")
    for row in t["batches"]:
        print(f"{row['batch']:>16}{_ms(row['eager_us']['median']):>14}{_ms(row['picked_us']['median']):>16}"
              f"{row['speedup']:>9.2f}x")
    print(f"'{name}' was picked by backend 'auto' in {t['choose_seconds']} s (checked against eager torch, "
          f"relative difference of the samples {t['agreement']:.1e}); `fdp tune` shows why" if
          result["selection"].startswith(f"backend '{name}' (auto") else f"backend '{name}' was named")
    K = len(result["tasks"][0]["weights"])
    print(f"\n{'task':<7}{'on a mode':>10}{'left / right detour':>22}   mean router weights (k=0..{K - 1})   leans on")
    weights = torch.tensor([r["weights"] for r in result["tasks"]])
    for r in result["tasks"]:
        split = f"{r['mode_split'][0]:.0%} / {r['mode_split'][1]:.0%}"
        w = " ".join(f"{x:.2f}" for x in r["weights"])
        top = sorted(r["weights"], reverse=True)
        leans = f"k={r['dominant']}" if top[0] - top[1] >= SAME_WEIGHTS else "no one"
        print(f"{r['task']:<7}{r['on_mode']:>10.0%}{split:>22}   {w:<34}   {leans}")
    if float((weights - weights.mean(0)).abs().max()) < SAME_WEIGHTS:
        print(f"\nthe router gives every task about the same weights (within {SAME_WEIGHTS}): the components "
              "are not specialised by task in this run; every sample is a blend of all K of them (the paper's "
              "loss does not push them apart on this task set)")
    if result.get("quick"):
        print("\nquick run: too short to cover the modes; without --quick the demo trains "
              f"{TRAIN_STEPS} steps")
    else:
        covered = all(r["on_mode"] >= 0.8 and min(r["mode_split"]) >= 0.2 for r in result["tasks"])
        print("\nevery task's two modes are covered" if covered else
              "\nsome task's modes are not covered well (train longer: --train-steps)")
    print(f"plot: {result['plot']}")
