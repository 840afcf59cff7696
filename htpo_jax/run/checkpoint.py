"""Checkpoints: an Orbax CheckpointManager holding the train state pytree plus a JSON item.

The state is any pytree of arrays (params, optax state, step, RNG key); the JSON item holds what
is not an array: the data position, the step, the config dict. Each save lands in
`<dir>/<step>/{state,extra}`. Orbax writes into a temporary directory and renames it when
complete, so a crash mid-save leaves a temporary directory that is never restored (and is removed
on the next start), never a half checkpoint. The newest `max_to_keep` checkpoints are kept.

Typed PRNG keys (`jax.random.key`) are stored as their raw `key_data` and re-wrapped on restore
with the implementation of the template's key, since array serializers take plain dtypes only.
Saves are asynchronous: training continues while the arrays are written; `wait()` / `close()`
block until the last save is committed. A failed save (full disk, lost mount) raises
`CheckpointSaveError`, one line with the path and errno, at the next `check()` (the trainer calls it
every step), `save()`, `wait()` or `close()`.

Resume (`restore_latest`) walks the steps newest first and restores the first that loads and that
`verify` accepts, warning about each skipped one (a truncated or missing file in the newest step
falls back to the one before it). Every save records the parameter shapes in the JSON item so
that a different model is reported in one line before any array is read.

The directory is a local path or a `gs://bucket/path` URL (`checkpoint_path`): Orbax writes
arrays through tensorstore's GCS driver and the rest through etils.epath, which needs gcsfs
(`pip install 'htpo_jax[gcs]'`). A URL is never turned into a local directory named `gs:`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from htpo_jax.infra.distributed import HostSync, SetupError

log = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"


class CheckpointSaveError(RuntimeError):
    """A background save failed; the message is one line naming the path and the OS error."""


class CheckpointMismatch(ValueError):
    """The checkpoint was written for a model of other shapes (one line: the first difference)."""


def _os_error(exc: BaseException) -> BaseException:
    """The OSError somewhere in an exception's cause/context chain (or the exception itself)."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def param_shapes(state: Any) -> dict[str, list[int]]:
    """'params/path/to/leaf' -> shape, for the shape check on restore."""
    params = getattr(state, "params", state)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        jax.tree_util.keystr(path): list(getattr(x, "shape", ()))
        for path, x in flat
        if x is not None
    }


def check_shapes(saved: dict | None, template_state: Any, step: int) -> None:
    """One line naming the first parameter whose shape differs (or that exists on one side)."""
    if not saved:
        return  # a checkpoint from before shapes were recorded
    now = param_shapes(template_state)
    for name in sorted(saved.keys() | now.keys()):
        a, b = saved.get(name), now.get(name)
        if a != b:
            raise CheckpointMismatch(
                f"checkpoint {step} was written for another model: parameter {name} has shape "
                f"{a} there and {b} in model.path (resume with the same model, or use a new "
                "trainer.output_dir)"
            )


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
        read_only: bool = False,
    ):
        self.directory = checkpoint_path(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # A reader (export, evaluate) makes no directory and starts no clean-up thread: that
            # thread, still running when a reader exits at once ("no checkpoint"), printed a
            # traceback at interpreter shutdown. Orbax's own read_only mode would warn on every use.
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a crash mid-save
            enable_async_checkpointing=async_save,
            # The step directory is made before save() returns (the arrays are still written in
            # the background): a lost mount or a file in its place then raises at once, instead
            # of leaving orbax's writer threads waiting 300 s for a "directory created" signal
            # that never comes, which held the process at exit for 5 minutes.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _EXTRA)
        )

    @staticmethod
    def steps_in(directory: str | os.PathLike, max_to_keep: int = 3) -> list[int]:
        """Steps of the complete checkpoints in `directory` ([] when it does not exist), read
        without creating or changing anything there."""
        path = checkpoint_path(directory)
        if not path.exists():
            return []
        with Checkpointer(path, max_to_keep=max_to_keep, read_only=True) as ckpt:
            return ckpt.all_steps()

    @classmethod
    def from_config(cls, cfg) -> Checkpointer:
        """The run's Checkpointer: cfg.checkpoint_dir with checkpoint.max_to_keep and
        checkpoint.save_every."""
        return cls(cfg.checkpoint_dir, cfg.checkpoint.max_to_keep, cfg.checkpoint.save_every)

    def should_save(self, step: int, last: bool = False) -> bool:
        """True every `save_every` steps (0: never) and at the last step."""
        return last or (self.save_every > 0 and step % self.save_every == 0)

    def _raise_save_error(self, exc: BaseException, step: int | str = "") -> None:
        err = _os_error(exc)
        where = getattr(err, "filename", None) or self.directory
        errno = f"errno {err.errno} " if getattr(err, "errno", None) else ""
        raise CheckpointSaveError(
            f"checkpoint save{f' of step {step}' if step != '' else ''} to {where} failed: "
            f"{errno}{_one_line(err)}"
        ) from exc

    def check(self) -> None:
        """Raise CheckpointSaveError now if a background save has failed (cheap; no waiting)."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            self._raise_save_error(e)

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> None:
        """Start writing checkpoint `step` (asynchronously); an existing step is left as is."""
        self.check()
        if step in self.all_steps():
            log.info("checkpoint %d already exists; not overwritten", step)
            return
        extra = dict(extra or {})
        extra.setdefault("step", int(step))
        extra.setdefault("param_shapes", param_shapes(state))
        try:
            self._save(step, state, extra)
        except CheckpointSaveError:
            raise
        except OSError as e:
            self._raise_save_error(e, step)

    def _save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
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

    def restore_extra(self, step: int) -> dict[str, Any]:
        """Only the JSON item of checkpoint `step` (no arrays are read)."""
        self.wait()
        out = self._manager.restore(
            step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()})
        )
        return dict(out[_EXTRA])

    def restore_latest(
        self,
        template_state: Any,
        check_extra: Callable[[int, dict], None] | None = None,
        verify: Callable[[Any], str | None] | None = None,
    ) -> tuple[Any, dict[str, Any]] | None:
        """(state, extra) of the newest checkpoint that loads and verifies, or None if none.

        Newest first: a checkpoint whose files do not load, or for which `verify(state)` returns
        a reason, is skipped with a warning naming its step. `check_extra(step, extra)` sees the
        JSON item first; what it raises (e.g. a config or model mismatch, which no older
        checkpoint would fix) propagates. A shape mismatch raises CheckpointMismatch.
        """
        steps = sorted(self.all_steps(), reverse=True)
        skipped: list[int] = []

        def skip(step: int, reason: str) -> None:
            log.warning("checkpoint %d in %s %s; skipping it", step, self.directory, reason)
            skipped.append(step)

        for step in steps:
            try:
                extra = self.restore_extra(step)
            except Exception as e:
                skip(step, f"does not load ({_one_line(e)})")
                continue
            check_shapes(extra.get("param_shapes"), template_state, step)
            if check_extra is not None:
                check_extra(step, extra)
            log.info("restoring checkpoint %d from %s", step, self.directory)
            try:
                state, extra = self.restore(step, template_state)
            except Exception as e:
                skip(step, f"does not load ({_one_line(e)})")
                continue
            reason = verify(state) if verify is not None else None
            if reason:
                skip(step, reason)
                continue
            if skipped:
                log.warning(
                    "resuming from checkpoint %d instead of the newest, %d (skipped: %s)",
                    step,
                    steps[0],
                    skipped,
                )
            return state, extra
        if skipped:
            raise CheckpointMismatch(
                f"no checkpoint in {self.directory} loads (tried steps {skipped}); move them away "
                "or set checkpoint.resume=false with a new trainer.output_dir"
            )
        return None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None; waits for this process's saves in flight
        and rereads the directory for those of earlier processes."""
        self.wait()  # a save of this process still in flight counts once committed
        self._manager.reload()  # pick up checkpoints written by an earlier process
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints (saves still in flight not included)."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until the saves in flight finish; a failed one raises CheckpointSaveError."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_save_error(e)

    def close(self) -> None:
        """Waits for the saves in flight, then closes the manager (also when a save failed)."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- shared checkpoint dir
def check_shared_dir(directory, sync: HostSync) -> None:
    """Refuse (SetupError) a multi-host checkpoint dir that some host cannot see.

    Process 0 writes a marker file; every other host must find it. Orbax's first save would
    otherwise stall at a barrier and fail with no checkpoint.
    """
    if jax.process_count() == 1:
        return
    directory = checkpoint_path(directory)
    nonce = uuid.uuid4().hex if jax.process_index() == 0 else ""
    marker = None
    if nonce:
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / f".htpo_shared_check_{nonce}"
        marker.write_text(nonce)
    nonce = sync.allgather_bytes("checkpoint dir check (write)", nonce.encode())[0].decode()
    probe = directory / f".htpo_shared_check_{nonce}"
    seen = probe.exists() and probe.read_text() == nonce
    verdicts = sync.allgather_bytes("checkpoint dir check (read)", b"1" if seen else b"0")
    if marker is not None:
        marker.unlink()
    blind = [p for p, v in enumerate(verdicts) if v != b"1"]
    if blind:
        raise SetupError(
            f"checkpoint.dir {str(directory)!r} is not shared between hosts: process(es) "
            f"{blind} cannot see a file process 0 wrote there; use a shared filesystem or gs://"
        )
