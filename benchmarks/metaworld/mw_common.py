"""Shared code of the MetaWorld benchmark: environments, demonstrations, data, models, training, evaluation.

Needs the optional extra: ``pip install -e '.[metaworld]'`` (metaworld>=3, mujoco, tqdm).

Setting (see docs/metaworld.md):

- environments: MetaWorld v3, goal observable (the multitask "MT" observation: 39-d state,
  18-d current + 18-d previous proprio/object state + 3-d goal). Task variations are the
  ``metaworld.MT1(env_name, seed=s).train_tasks`` (50 random object/goal placements per seed)
  set on the environment with ``env.set_task``; demos use seeds ``DEMO_SEED, DEMO_SEED+1, ...``
  and evaluation uses ``EVAL_SEED`` (a disjoint set of placements, checked).
- conditioning: two stacked observations (t-1, t), each normalised to [-1, 1] with min/max
  from the demos, plus a one-hot task id over all 10 tasks: 2 * 39 + 10 = 88 features. Without
  the task id (``task_id=False``) those 10 features are zero: the same networks and parameter
  counts, and a constant-zero input adds nothing to a first layer, so it is the same as leaving
  them out.
- actions: chunks of 16 (padded with the last action at an episode's end), normalised to
  [-1, 1]; at test time 16 are sampled and the first 8 executed (receding horizon).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import fdp

MT_TASKS = ["door-open-v3", "drawer-open-v3", "assembly-v3", "window-close-v3", "hammer-v3",
            "peg-insert-side-v3"]
ADAPT_TASKS = ["door-close-v3", "drawer-close-v3", "disassemble-v3", "window-open-v3"]
ALL_TASKS = MT_TASKS + ADAPT_TASKS
TASK_INDEX = {name: i for i, name in enumerate(ALL_TASKS)}

OBS_DIM = 39
ACTION_DIM = 4
N_OBS_STEPS = 2
HORIZON = 16
N_ACTION_STEPS = 8
COND_DIM = N_OBS_STEPS * OBS_DIM + len(ALL_TASKS)

DEMO_SEED = 0
EVAL_SEED = 10_000

DEFAULT_CACHE = os.environ.get("FDP_METAWORLD_CACHE", os.path.expanduser("~/.cache/fdp-metaworld"))


def _quiet():
    # The scripted experts warn about large gains on every step; the env warns about gymnasium API.
    warnings.filterwarnings("ignore")


# -- environments and task variations ---------------------------------------------------------

_ENV_CACHE: dict[tuple[str, int], object] = {}


def make_env(name: str, slot: int = 0):
    """A raw MetaWorld v3 env for task ``name`` (cached per (name, slot)); call ``set_task`` before use."""
    _quiet()
    key = (name, slot)
    if key not in _ENV_CACHE:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        _ENV_CACHE[key] = ALL_V3_ENVIRONMENTS[name]()
    return _ENV_CACHE[key]


@functools.lru_cache(maxsize=None)
def variations(name: str, seed: int, n: int) -> list:
    """``n`` task variations (metaworld ``Task``s, goal observable) from MT1 seeds seed, seed+1, ..."""
    _quiet()
    import metaworld

    tasks: list = []
    s = seed
    while len(tasks) < n:
        tasks.extend(metaworld.MT1(name, seed=s).train_tasks)
        s += 1
    return tuple(tasks[:n])


def rand_vec(task) -> np.ndarray:
    import pickle

    return np.asarray(pickle.loads(task.data)["rand_vec"])


def expert(name: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[name]()


# -- demonstrations ----------------------------------------------------------------------------

def run_expert(name: str, task, max_steps: int = 500):
    """One scripted-expert episode; returns (obs [T+1, 39], actions [T, 4], success).

    The episode stops at the first step with ``info["success"]``.
    """
    env = make_env(name)
    env.set_task(task)
    pol = expert(name)
    obs, _ = env.reset()
    obs_list, act_list = [obs], []
    for _ in range(max_steps):
        a = np.clip(pol.get_action(obs), -1.0, 1.0).astype(np.float32)
        obs, _, _, trunc, info = env.step(a)
        obs_list.append(obs)
        act_list.append(a)
        if info["success"]:
            return np.asarray(obs_list, np.float32), np.asarray(act_list, np.float32), True
        if trunc:
            break
    return np.asarray(obs_list, np.float32), np.asarray(act_list, np.float32), False


def make_demos(name: str, n_demos: int, seed: int = DEMO_SEED, max_steps: int = 500, log=print) -> dict:
    """Keep the first ``n_demos`` successful expert episodes over variations of ``seed``."""
    tasks = variations(name, seed, n_demos * 3)  # plenty: the experts fail on a few placements
    obs, acts, vecs = [], [], []
    tried = 0
    for task in tasks:
        if len(obs) == n_demos:
            break
        tried += 1
        o, a, ok = run_expert(name, task, max_steps)
        if ok:
            obs.append(o)
            acts.append(a)
            vecs.append(rand_vec(task))
    if len(obs) < n_demos:
        raise RuntimeError(f"{name}: only {len(obs)} successful expert episodes out of {tried}")
    lengths = np.array([len(a) for a in acts])
    log(f"  {name:20s} {n_demos} successful of {tried} tried, episode length {lengths.mean():.0f} "
        f"(min {lengths.min()}, max {lengths.max()})")
    return {"obs": obs, "actions": acts, "rand_vecs": np.stack(vecs), "tried": tried}


def demo_path(cache_dir: str, name: str, n_demos: int, seed: int = DEMO_SEED) -> str:
    return os.path.join(cache_dir, "demos", f"{name}_n{n_demos}_s{seed}.npz")


def save_demos(path: str, demos: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lengths = np.array([len(a) for a in demos["actions"]])
    np.savez_compressed(path, obs=np.concatenate(demos["obs"]), actions=np.concatenate(demos["actions"]),
                        lengths=lengths, rand_vecs=demos["rand_vecs"], tried=demos["tried"])


def load_demos(path: str) -> dict:
    z = np.load(path)
    lengths = z["lengths"]
    obs, acts = [], []
    o0 = a0 = 0
    for n in lengths:
        obs.append(z["obs"][o0:o0 + n + 1])
        acts.append(z["actions"][a0:a0 + n])
        o0 += n + 1
        a0 += n
    return {"obs": obs, "actions": acts, "rand_vecs": z["rand_vecs"], "tried": int(z["tried"])}


def get_demos(cache_dir: str, names, n_demos: int, seed: int = DEMO_SEED, log=print) -> dict:
    """Demos per task name, generated once and cached as .npz under ``cache_dir/demos``."""
    out = {}
    for name in names:
        path = demo_path(cache_dir, name, n_demos, seed)
        if not os.path.exists(path):
            save_demos(path, make_demos(name, n_demos, seed, log=log))
        out[name] = load_demos(path)
    return out


# -- normalisation and the dataset ---------------------------------------------------------------

@dataclass
class Normalizer:
    """Per-dimension affine map of [min, max] onto [-1, 1] (constant dimensions are only centred)."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Normalizer":
        return cls(x.min(axis=0).astype(np.float32), x.max(axis=0).astype(np.float32))

    def _scale_offset(self):
        rng = self.hi - self.lo
        const = rng < 1e-4
        scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, rng)).astype(np.float32)
        offset = (-(self.hi + self.lo) / 2 * scale).astype(np.float32)
        return scale, offset

    def normalize(self, x):
        s, o = self._scale_offset()
        return x * s + o

    def unnormalize(self, y):
        s, o = self._scale_offset()
        return (y - o) / s

    def state(self) -> dict:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist()}


def fit_normalizers(demos: dict) -> tuple[Normalizer, Normalizer]:
    obs = np.concatenate([o for d in demos.values() for o in d["obs"]])
    act = np.concatenate([a for d in demos.values() for a in d["actions"]])
    return Normalizer.fit(obs), Normalizer.fit(act)


def task_vec(name: str, task_id: bool = True) -> np.ndarray:
    """The task-id features of ``name``: its one-hot over all 10 tasks, or zeros without the task id."""
    v = np.zeros(len(ALL_TASKS), np.float32)
    if task_id:
        v[TASK_INDEX[name]] = 1.0
    return v


def make_cond(obs_prev: np.ndarray, obs_now: np.ndarray, task_vec: np.ndarray, obs_norm: Normalizer) -> np.ndarray:
    """Conditioning features [..., 88] from raw observations and a one-hot task id."""
    return np.concatenate([obs_norm.normalize(obs_prev), obs_norm.normalize(obs_now), task_vec], axis=-1)


def build_dataset(demos: dict, names, obs_norm: Normalizer, act_norm: Normalizer, task_id: bool = True):
    """Training pairs (cond [N, 88], action chunk [N, 16, 4]), one per demo step, as float32 tensors.

    The chunk at step t is a_t .. a_{t+15} (the last action repeated past the episode's end),
    conditioned on (o_{t-1}, o_t) (o_0 repeated at t = 0).
    """
    conds, chunks = [], []
    for name in names:
        tv = task_vec(name, task_id)
        for o, a in zip(demos[name]["obs"], demos[name]["actions"]):
            T = len(a)
            t = np.arange(T)
            prev = o[np.maximum(t - 1, 0)]
            conds.append(make_cond(prev, o[t], np.broadcast_to(tv, (T, len(tv))), obs_norm))
            idx = np.minimum(t[:, None] + np.arange(HORIZON)[None], T - 1)
            chunks.append(act_norm.normalize(a[idx]))
    return (torch.from_numpy(np.concatenate(conds).astype(np.float32)),
            torch.from_numpy(np.concatenate(chunks).astype(np.float32)))


# -- models ----------------------------------------------------------------------------------------

def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_component(hidden: int, num_blocks: int = 2) -> fdp.MLPDenoiser:
    return fdp.MLPDenoiser(ACTION_DIM, HORIZON, global_cond_dim=COND_DIM, hidden_dim=hidden, num_blocks=num_blocks)


def make_policy(K: int, hidden: int, num_blocks: int = 2, strategy: str = "soft", topk: int = 2) -> fdp.FactorizedPolicy:
    comps = [make_component(hidden, num_blocks) for _ in range(K)]
    router = fdp.Router(COND_DIM, K, strategy=strategy, topk=min(topk, K))
    return fdp.FactorizedPolicy(comps, router, HORIZON, ACTION_DIM)


def matched_hidden(K: int, hidden: int, num_blocks: int = 2) -> int:
    """Hidden width of a K=1 policy whose parameter count is closest to the K-component one's."""
    target = num_params(make_policy(K, hidden, num_blocks))
    lo, hi = hidden, hidden * K
    best = min(range(lo, hi + 1), key=lambda h: abs(num_params(make_policy(1, h, num_blocks)) - target))
    return best


def ddim(num_inference_steps: int = 10):
    sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type="epsilon")
    return sched, num_inference_steps


class EMA:
    """Exponential moving average of a module's floating-point parameters (with warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.995):
        self.module = copy.deepcopy(module).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for pe, p in zip(self.module.parameters(), module.parameters()):
            if p.requires_grad:
                pe.mul_(d).add_(p.detach(), alpha=1 - d)


def train(policy: fdp.FactorizedPolicy, cond: torch.Tensor, actions: torch.Tensor, params, steps: int,
          batch_size: int, lr: float, seed: int, desc: str = "train", ema_decay: float = 0.995,
          weight_decay: float = 1e-6, warmup: int = 100, progress: bool = True, loss_kwargs: dict | None = None,
          replay=None):
    """AdamW with warm-up and cosine decay on ``policy.loss``; returns (EMA policy, loss curve).

    ``loss_kwargs`` go to ``policy.loss`` (e.g. ``component_weight``, ``balance_weight``).
    ``replay = (cond_old, actions_old, fraction)`` replaces that fraction of every batch with
    samples drawn from a second dataset (old-task replay during adaptation).
    """
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = EMA(policy, ema_decay)
    policy.train()
    curve, run = [], 0.0
    n_old = 0 if replay is None else round(replay[2] * batch_size)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0, ncols=100)
    for step in bar:
        idx = torch.randint(0, len(cond), (batch_size - n_old,), generator=g)
        a, c = actions[idx], cond[idx]
        if n_old:
            old = torch.randint(0, len(replay[0]), (n_old,), generator=g)
            a, c = torch.cat([a, replay[1][old]]), torch.cat([c, replay[0][old]])
        loss = policy.loss(a, c, generator=g, **(loss_kwargs or {}))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(policy)
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            curve.append((step, round(run, 5)))
            bar.set_postfix(loss=f"{run:.4f}")
    return ema.module, curve


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(policy: fdp.FactorizedPolicy, names, obs_norm: Normalizer, act_norm: Normalizer, n_episodes: int,
             max_steps: int, seed: int = 0, eval_seed: int = EVAL_SEED, envs_per_task: int = 5,
             backend: str = "torch", exclude_vecs: dict | None = None, progress: bool = True, desc: str = "eval",
             task_id: bool = True):
    """Success rate per task over ``n_episodes`` unseen variations (receding horizon: sample 16, run 8).

    Episodes of all tasks run side by side (``envs_per_task`` envs per task) so that one batched
    ``fdp.Sampler`` call serves every active episode. Success = ``info["success"]`` at any step of an
    episode of at most ``max_steps`` steps. ``seed`` seeds the sampler's noise. ``task_id`` as in
    :func:`build_dataset` (it must match how the policy was trained).
    """
    from tqdm import tqdm

    _quiet()
    policy = policy.eval()
    sched, n_inf = ddim()
    sampler = fdp.Sampler(policy, sched, num_inference_steps=n_inf, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    work = []  # (name, variation index, task)
    for name in names:
        tasks = variations(name, eval_seed, n_episodes)
        if exclude_vecs is not None and name in exclude_vecs:
            seen = exclude_vecs[name]
            for t in tasks:
                if np.any(np.all(np.isclose(seen, rand_vec(t)), axis=1)):
                    raise RuntimeError(f"{name}: an evaluation variation is also a demo variation")
        work.extend((name, i, t) for i, t in enumerate(tasks))
    success = {name: [] for name in names}
    lengths = {name: [] for name in names}
    pending = {name: [w for w in work if w[0] == name] for name in names}
    bar = tqdm(total=len(work), desc=desc, disable=not progress, mininterval=2.0, ncols=100)
    while any(pending.values()):
        slots = []  # active episodes: dict(name, env, prev, obs, t, done)
        for name in names:
            for s in range(envs_per_task):
                if not pending[name]:
                    break
                _, _, task = pending[name].pop(0)
                env = make_env(name, s)
                env.set_task(task)
                obs, _ = env.reset()
                slots.append(dict(name=name, env=env, prev=obs, obs=obs, t=0, done=False, ok=False,
                                  tv=task_vec(name, task_id)))
        while True:
            active = [sl for sl in slots if not sl["done"]]
            if not active:
                break
            cond = np.stack([make_cond(sl["prev"], sl["obs"], sl["tv"], obs_norm) for sl in active])
            chunk = sampler(torch.from_numpy(cond.astype(np.float32)), generator=gen).numpy()
            chunk = act_norm.unnormalize(chunk)
            for sl, acts in zip(active, chunk):
                for a in acts[:N_ACTION_STEPS]:
                    obs, _, _, trunc, info = sl["env"].step(np.clip(a, -1.0, 1.0).astype(np.float32))
                    sl["prev"], sl["obs"] = sl["obs"], obs
                    sl["t"] += 1
                    if info["success"]:
                        sl["ok"] = True
                    if sl["ok"] or sl["t"] >= max_steps or trunc:
                        sl["done"] = True
                        break
        for sl in slots:
            success[sl["name"]].append(bool(sl["ok"]))
            lengths[sl["name"]].append(sl["t"])
        bar.update(len(slots))
    bar.close()
    return {name: {"success_rate": float(np.mean(success[name])), "episodes": len(success[name]),
                   "mean_length": float(np.mean(lengths[name]))} for name in names}


def timer():
    t0 = time.time()
    return lambda: round(time.time() - t0, 1)
