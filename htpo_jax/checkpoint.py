"""Checkpoints: an Orbax CheckpointManager holding the train state pytree plus a JSON item.

The state is any pytree of arrays (params, optax state, step, RNG key); the JSON item holds what
is not an array: the data position, the step, the config dict. Each save lands in
`<dir>/<step>/{state,extra}`. Orbax writes into a temporary directory and renames it when
complete, so a crash mid-save leaves a temporary directory that is never restored (and is removed
on the next start), never a half checkpoint. The newest `max_to_keep` checkpoints are kept.

Typed PRNG keys (`jax.random.key`) are stored as their raw `key_data` and re-wrapped on restore
with the implementation of the template's key, since array serializers take plain dtypes only.
Saves are asynchronous: training continues while the arrays are written; `wait()` / `close()`
block until the last save is committed.

The directory is a local path or a `gs://bucket/path` URL (`checkpoint_path`): Orbax writes
arrays through tensorstore's GCS driver and the rest through etils.epath, which needs gcsfs
(`pip install 'htpo_jax[gcs]'`). A URL is never turned into a local directory named `gs:`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Replace typed PRNG key leaves by their uint32 key data (a plain array)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _abstract(x):
    """Restore target for one template leaf: same shape, dtype and (if any) sharding."""
    if _is_typed_key(x):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(
                "abstract typed PRNG keys are not supported in a restore template; "
                "pass a concrete key (e.g. jax.random.key(0)) of the right implementation"
            )
        return x
    return x  # numpy arrays and Python scalars restore as such


def _rewrap_keys(template, restored):
    def fix(t, r):
        if _is_typed_key(t):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        return r

    return jax.tree.map(fix, template, restored)


class StorageError(ValueError):
    """A checkpoint location that cannot be used (one line, names the directory)."""


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
    """`gs://bucket/path` as a Cloud Storage path, anything else as an absolute local path."""
    text = os.fspath(directory)
    if "://" not in text:
        return epath.Path(os.path.abspath(text))
    if not text.startswith("gs://") or len(text) <= len("gs://"):
        raise StorageError(f"checkpoint dir {text!r}: only gs://BUCKET/PATH URLs or local paths")
    if importlib.util.find_spec("gcsfs") is None:
        raise StorageError(
            f"checkpoint dir {text!r} is on Cloud Storage, which needs gcsfs: "
            f"pip install 'htpo_jax[gcs]'"
        )
    return epath.Path(text)


class Checkpointer:
    """Save every `save_every` steps (and on demand), keep `max_to_keep`, restore the latest.

    >>> ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.max_to_keep,
    ...                     cfg.checkpoint.save_every)
    >>> restored = ckpt.restore_latest(state) if cfg.checkpoint.resume else None
    >>> ...
    >>> if ckpt.should_save(step): ckpt.save(step, state, {"data": ds.to_json(), ...})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int = 3,
        save_every: int = 10,
        async_save: bool = True,
    ):
        self.directory = checkpoint_path(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a crash mid-save
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _EXTRA)
        )

    @classmethod
    def from_config(cls, cfg) -> Checkpointer:
        return cls(cfg.checkpoint_dir, cfg.checkpoint.max_to_keep, cfg.checkpoint.save_every)

    def should_save(self, step: int, last: bool = False) -> bool:
        """True every `save_every` steps (0: never) and at the last step."""
        return last or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> None:
        """Start writing checkpoint `step` (asynchronously); an existing step is left as is."""
        if step in self.all_steps():
            log.info("checkpoint %d already exists; not overwritten", step)
            return
        extra = dict(extra or {})
        extra.setdefault("step", int(step))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(_keys_to_data(state)),
                    _EXTRA: ocp.args.JsonSave(extra),
                }
            ),
            force=True,
        )

    def restore(self, step: int, template_state: Any) -> tuple[Any, dict[str, Any]]:
        """Checkpoint `step` restored onto the template's structure, dtypes and shardings."""
        self.wait()
        target = jax.tree.map(_abstract, template_state)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(target), _EXTRA: ocp.args.JsonRestore()}
            ),
        )
        return _rewrap_keys(template_state, out[_STATE]), dict(out[_EXTRA])

    def restore_latest(self, template_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """(state, extra) of the newest complete checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        log.info("restoring checkpoint %d from %s", step, self.directory)
        return self.restore(step, template_state)

    def latest_step(self) -> int | None:
        self.wait()  # a save of this process still in flight counts once committed
        self._manager.reload()  # pick up checkpoints written by an earlier process
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints (saves still in flight not included)."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
