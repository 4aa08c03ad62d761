"""A rank stand-in for tests/launch/test_orphans.py: saves a checkpoint, starts more helpers, waits.

``python -m tests.launch.orphan_saver ROOT``: one gloo rank saves a tiny model with
``save_checkpoint`` (dist_checkpointing starts its spawned manager and forked writers), then starts
a forked and a spawned helper from a worker thread that exits at once (Linux's parent-death signal
would fire on that thread's exit; the guard must not kill them for it), one forked helper from
the main thread and one from a fork server (its OS parent is the server, not this process: the
default start method from Python 3.14). It prints ``READY`` and sleeps until it is killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time


def _sleep() -> None:
    time.sleep(600)


def main(root: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=0, world_size=1)
    from megatron_eaopd.compat.cpu import enable_cpu_compat

    enable_cpu_compat()
    from megatron_eaopd.models import build_model, get_preset
    from megatron_eaopd.models.checkpoint import save_checkpoint
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    chunks = build_model(get_preset("tiny-student"))
    save_checkpoint(os.path.join(root, "ckpt"), 1, chunks, save_rng=False)
    helpers = []

    def start_from_thread():
        for method in ("fork", "spawn"):
            p = mp.get_context(method).Process(target=_sleep, daemon=False)
            p.start()
            helpers.append(p)

    worker = threading.Thread(target=start_from_thread)
    worker.start()
    worker.join()  # the thread that started them has exited
    for method in ("fork", "forkserver"):
        p = mp.get_context(method).Process(target=_sleep, daemon=False)
        p.start()
        helpers.append(p)
    print("HELPERS", " ".join(str(h.pid) for h in helpers), flush=True)
    print("READY", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1])
