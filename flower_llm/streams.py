"""Independent random streams of a run: who trains, who evaluates, and the DP noise.

Each stream is its own numpy ``Generator``, so drawing from one never moves another: how
many sites evaluate (``fed.fraction-evaluate``), or how often (``fed.evaluate-every``),
cannot change which sites train later, and the checkpoint carries every stream's state so
a resumed run draws what the uninterrupted run would have drawn.

Seeding: evaluation sampling always follows ``seed`` (the run-config's, public). Train
sampling follows it too, unless the run has client-level DP: then train sampling and noise
come from operating-system entropy, because the Poisson sampling that amplifies privacy
and the Gaussian noise both protect only while nobody can predict them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

TRAIN_SAMPLING = "train-sampling"
EVAL_SAMPLING = "eval-sampling"
DP_NOISE = "dp-noise"
STREAMS = (TRAIN_SAMPLING, EVAL_SAMPLING, DP_NOISE)


class RandomStreams:
    """The run's random streams, by name (:data:`STREAMS`).

    Parameters
    ----------
    seed : int
        Seeds every public stream; stream ``i`` gets ``SeedSequence([seed, i])``.
    secret : bool
        Draw :data:`TRAIN_SAMPLING` and :data:`DP_NOISE` from OS entropy instead.
    """

    def __init__(self, seed: int, *, secret: bool = False) -> None:
        self.secret = secret
        self._rngs: dict[str, np.random.Generator] = {}
        for index, name in enumerate(STREAMS):
            if secret and name != EVAL_SAMPLING:
                self._rngs[name] = np.random.default_rng()
            else:
                self._rngs[name] = np.random.default_rng(np.random.SeedSequence([seed, index]))

    def __getitem__(self, name: str) -> np.random.Generator:
        if name not in self._rngs:
            raise KeyError(f"no random stream {name!r}; streams are {list(STREAMS)}")
        return self._rngs[name]

    @property
    def train(self) -> np.random.Generator:
        """Draws which sites train each round."""
        return self._rngs[TRAIN_SAMPLING]

    @property
    def evaluate(self) -> np.random.Generator:
        """Draws which sites evaluate each round."""
        return self._rngs[EVAL_SAMPLING]

    @property
    def noise(self) -> np.random.Generator:
        """Draws the DP noise (and the adaptive clip count's noise)."""
        return self._rngs[DP_NOISE]

    def state_dict(self) -> dict[str, Any]:
        """Every stream's bit-generator state, JSON-safe.

        With DP on this predicts future noise and sampling: keep it as private as the
        clients' individual updates (the checkpoint file is owner-only).
        """
        return {name: jsonable(rng.bit_generator.state) for name, rng in self._rngs.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue every stream from :meth:`state_dict`; a missing stream is an error."""
        missing = sorted(set(STREAMS) - set(state))
        if missing:
            raise ValueError(f"random-stream state lacks {missing}")
        for name in STREAMS:
            self._rngs[name].bit_generator.state = dict(state[name])


def jsonable(state: Mapping[str, Any]) -> dict[str, Any]:
    """A numpy bit-generator state with its integers as plain ints (JSON-safe)."""
    return {
        k: (jsonable(v) if isinstance(v, Mapping) else int(v) if isinstance(v, np.integer) else v)
        for k, v in state.items()
    }
