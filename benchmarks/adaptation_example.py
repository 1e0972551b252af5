"""Adapting a factorized policy to a new task: how far the new component's router weight gets.

The demo's task set (``fdp.demo``): a policy of K = 3 MLP components is
trained on three tasks ("right", "up", "left"); then one component is added
for the fourth ("down"), ``policy.adapt("router+new")`` freezes the old ones,
and AdamW trains the router and the new component, on the new task only or
with the old tasks' data mixed in ("replay"), with several learning rates and
step counts. For each it prints the new component's weight on the new task,
how many of the new task's samples land on one of its modes, and the same for
the old tasks (forgetting).

    python benchmarks/adaptation_example.py      # about 3 CPU-minutes

The README's adaptation guidance quotes a run of this script.
"""

from __future__ import annotations

import copy
import time

import torch

import fdp
from fdp import demo

BASE_STEPS = 1500
NEW_TASK = 3
OLD_TASKS = (0, 1, 2)
# (old-task data mixed in?, router lr, new component's lr, steps)
VARIANTS = ((False, 2e-3, 2e-3, 100), (False, 2e-3, 2e-3, 1000), (False, 2e-2, 2e-3, 300),
            (True, 2e-3, 2e-3, 1000), (True, 2e-2, 2e-3, 300), (True, 2e-2, 2e-3, 1000))


def train(policy, params_or_groups, tasks, steps, gen, lr):
    opt = torch.optim.AdamW(params_or_groups, lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        actions, cond, _, _ = demo.make_batch(256, gen, tasks=tasks)
        loss = policy.loss(actions, cond, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def score(policy, n=200, seed=1):
    sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sampler = fdp.Sampler(policy, sched, num_inference_steps=10, backend="torch")
    cond = torch.eye(len(demo.TASKS)).repeat_interleave(n, dim=0)
    x = sampler(cond, generator=torch.Generator().manual_seed(seed))
    reports = demo.evaluate(x.reshape(len(demo.TASKS), n, demo.HORIZON, demo.ACTION_DIM),
                            policy.weights(torch.eye(len(demo.TASKS))))
    return reports


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    Dc = len(demo.TASKS)  # the observation already has a slot for the new task's one-hot
    comps = [fdp.MLPDenoiser(demo.ACTION_DIM, demo.HORIZON, global_cond_dim=Dc, hidden_dim=128, num_blocks=2)
             for _ in range(3)]
    base = fdp.FactorizedPolicy(comps, fdp.Router(Dc, 3, hidden_dim=32), demo.HORIZON, demo.ACTION_DIM)
    t0 = time.process_time()
    train(base, base.parameters(), OLD_TASKS, BASE_STEPS, gen, lr=2e-3)
    r = score(base)
    print(f"base policy, {BASE_STEPS} steps on tasks {[demo.TASKS[i] for i in OLD_TASKS]}: on a mode: "
          + ", ".join(f"{x.task} {x.on_mode:.0%}" for x in r) + f"  ({time.process_time() - t0:.0f} CPU-s)",
          flush=True)

    print(f"\n{'data':>6} {'router lr':>9} {'new lr':>7} {'steps':>6} | {'new weight':>13} {'new task on a mode':>19} "
          "| old tasks on a mode")
    for replay, router_lr, new_lr, steps in VARIANTS:
        policy = copy.deepcopy(base)
        policy.add_component(fdp.MLPDenoiser(demo.ACTION_DIM, demo.HORIZON, global_cond_dim=Dc, hidden_dim=128,
                                             num_blocks=2))
        policy.adapt("router+new")
        with torch.no_grad():
            start = float(policy.weights(torch.eye(Dc))[NEW_TASK, -1])
        groups = [{"params": list(policy.router.parameters()), "lr": router_lr},
                  {"params": list(policy.components[-1].parameters()), "lr": new_lr}]
        tasks = (*OLD_TASKS, NEW_TASK) if replay else (NEW_TASK,)
        train(policy, groups, tasks, steps, torch.Generator().manual_seed(1), lr=new_lr)
        r = score(policy)
        w = float(r[NEW_TASK].weights[-1])
        print(f"{'replay' if replay else 'new':>6} {router_lr:>9g} {new_lr:>7g} {steps:>6} | {start:.4f}->{w:.3f} "
              f"{r[NEW_TASK].on_mode:>19.0%} | " + ", ".join(f"{r[i].task} {r[i].on_mode:.0%}" for i in OLD_TASKS),
              flush=True)
    print(f"\ntotal {time.process_time() - t0:.0f} CPU-s")


if __name__ == "__main__":
    main()
