"""`python -m hyjax.train` that kills itself (SIGKILL) at a fixed point of one checkpoint's save, for the
fault tests:

    python tests/kill_points.py POINT STEP base key=value...    # the arguments of python -m hyjax.train

POINT (the save of checkpoint STEP):
  * `before-commit`: every array written into Orbax's temporary folder, before Orbax renames it (the
    same hook Orbax's own tests patch);
  * `before-digest`: the checkpoint committed, before its digest is written;
  * `in-digest`: the digest written to its temporary file, before it replaces the final name.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    """Patches the code at `point` to kill this process during the save of checkpoint `step`."""
    if point == "before-commit":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_die(self, *args, **kwargs):
            if f"/{step}.orbax-checkpoint-tmp" in str(self.get()):
                _die()
            return await finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
    elif point == "before-digest":
        from hyjax.training import integrity

        write_digest = integrity.write_digest

        def write_digest_or_die(step_dir, process):
            if step_dir.name == str(step):
                _die()
            return write_digest(step_dir, process)

        integrity.write_digest = write_digest_or_die
    elif point == "in-digest":
        replace = os.replace

        def replace_or_die(source, target, *args, **kwargs):
            if str(source).endswith(".partial") and os.path.basename(os.path.dirname(source)) == str(step):
                _die()
            return replace(source, target, *args, **kwargs)

        os.replace = replace_or_die
    else:
        raise ValueError(f"unknown kill point {point!r}")


def main() -> None:
    point, step, *arguments = sys.argv[1:]
    arm(point, int(step))
    sys.argv = ["hyjax.train", *arguments]
    runpy.run_module("hyjax.train", run_name="__main__")


if __name__ == "__main__":
    main()
