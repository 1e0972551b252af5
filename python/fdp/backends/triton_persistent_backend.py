"""``backend="triton-persistent"``: the whole sampling loop of an MLPDenoiser policy in one Triton launch
(after one for the per-call terms).

Same packing, limits and availability as ``backend="triton"``
(:class:`fdp.backends.triton_backend.TritonBackendBase`); each sampling call
makes two launches and no other device work: the per-call terms
(:func:`fdp_kernels.call_terms.call_terms`), then the loop,
:func:`fdp_kernels.mlp_persistent.mlp_sample`: every program keeps its rows
of ``x`` on chip from x_T to x_0 through all T steps (on CUDA the call is one replay of a captured graph, as for
``triton``). ``run(..., seed=n)`` draws the step noise in the kernel instead
of reading ``step_noise`` (standard normal, deterministic per seed, but not
the numbers torch's generator would draw).
"""

from __future__ import annotations

from .triton_backend import TritonBackendBase, TritonPrepared


class TritonPersistentPrepared(TritonPrepared):
    def _sample(self, global_cond, x_T, step_noise, known=None, known_mask=None, seed=None):
        """The whole call: the per-call launch, then one launch for all T steps. Capturable."""
        from fdp_kernels.mlp_persistent import mlp_sample

        call, x, out, noise, seed, scratch, _ = self._inputs(global_cond, x_T, step_noise, seed, persistent=True)
        known, known_mask = self._known(known, known_mask, *x.shape)
        mlp_sample(self.packed, self.steps, call, self.coef, self.adds_noise, x, noise, seed=seed,
                   clip_range=self.clip_range, out=out, scratch=scratch, known=known, known_mask=known_mask,
                   **self.tuning)
        return out.reshape(x_T.shape).to(x_T.dtype)


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
