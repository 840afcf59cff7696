"""A checkpoint on gs:// against a local fake Cloud Storage server (test_multihost.py runs it).

Starts `gcp-storage-emulator` on 127.0.0.1, points tensorstore (arrays) and gcsfs (etils.epath:
metadata, directories) at it, saves and restores a train-state-like pytree through
`htpo_jax.run.checkpoint.Checkpointer("gs://...")`, lists what landed in the bucket, and checks that
no local `gs:` directory appeared. Prints OK at the end. Needs the `[test]` extra (gcsfs,
gcp-storage-emulator).
"""

import os
import socket
import subprocess
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
        + ["--port", str(port), "--default-bucket", "htpo-test", "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        os.environ.update(
            STORAGE_EMULATOR_HOST=url,  # gcsfs
            FSSPEC_GCS_TOKEN="anon",
            # gcsfs's storage-layout probe is a gRPC call the emulator does not serve
            GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
            TENSORSTORE_GCS_HTTP_URL=url,  # tensorstore's gcs driver
            GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",
        )
        os.chdir(tempfile.mkdtemp())
        import gcsfs
        import jax
        import jax.numpy as jnp
        import numpy as np

        from htpo_jax.run.checkpoint import Checkpointer

        state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7), "rng": jax.random.key(3)}
        with Checkpointer("gs://htpo-test/run/checkpoints", save_every=1) as ck:
            assert str(ck.directory) == "gs://htpo-test/run/checkpoints", ck.directory
            ck.save(1, state, {"data": "pos"})
            ck.save(2, jax.tree.map(lambda x: x, state), {"data": "pos2"})
        again = Checkpointer("gs://htpo-test/run/checkpoints")
        assert again.all_steps() == [1, 2], again.all_steps()
        restored, extra = again.restore_latest(state)
        again.close()
        np.testing.assert_array_equal(restored["w"], state["w"])
        assert int(restored["step"]) == 7 and extra["data"] == "pos2", extra
        np.testing.assert_array_equal(
            jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
        )
        objects = gcsfs.GCSFileSystem().find("htpo-test/run/checkpoints/2")
        assert any("/state/" in o and "ocdbt" in o for o in objects), objects  # tensorstore data
        assert any(o.endswith("/extra/metadata") for o in objects), objects  # epath / gcsfs
        assert not os.path.exists("gs:"), "a local gs: directory was created"
        print(f"{len(objects)} objects in gs://htpo-test/run/checkpoints/2")
        print("OK")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
