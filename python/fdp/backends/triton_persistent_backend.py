"""``backend="triton-persistent"``: the whole sampling loop of an MLPDenoiser policy in one Triton launch.

Same packing, limits and availability as ``backend="triton"``
(:class:`fdp.backends.triton_backend.TritonBackendBase`); each sampling call
computes the per-call terms and launches :func:`fdp_kernels.mlp_persistent.mlp_sample`
once: every program keeps its rows of ``x`` on chip from x_T to x_0 through
all T steps (on CUDA the call is one replay of a captured graph, as for
``triton``). ``run(..., seed=n)`` draws the step noise in the kernel instead
of reading ``step_noise`` (standard normal, deterministic per seed, but not
the numbers torch's generator would draw).
"""

from __future__ import annotations

from .triton_backend import TritonBackendBase, TritonPrepared


class TritonPersistentPrepared(TritonPrepared):
    def _sample(self, global_cond, x_T, step_noise, known=None, known_mask=None, seed=None):
        """The whole call: per-call terms, then one launch for all T steps. Capturable."""
        from fdp_kernels.mlp_persistent import mlp_sample

        call, x, noise, seed = self._inputs(global_cond, x_T, step_noise, seed)
        known, known_mask = self._known(known, known_mask, *x.shape)
        scratch, _ = self._workspace_for(x.shape[0], persistent=True)
        mlp_sample(self.packed, self.steps, call, self.coef, self.adds_noise, x, noise, seed=seed,
                   clip_range=self.clip_range, out=x, scratch=scratch, known=known, known_mask=known_mask,
                   **self.tuning)
        return x.reshape(x_T.shape).to(x_T.dtype)


class TritonPersistentBackend(TritonBackendBase):
    name = "triton-persistent"
    base_priority = 30
    prepared_class = TritonPersistentPrepared

    def __init__(self, **tuning):
        if "split" in tuning:
            raise TypeError("`split` tunes backend 'triton' (the per-step kernel's component split); the persistent "
                            "kernel keeps each row tile's components in one program and takes no `split`")
        super().__init__(**tuning)


BACKEND = TritonPersistentBackend()
