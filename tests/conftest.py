import os

# Tests run the loss kernels eagerly (no torch.compile latency in every spawned process); the
# compiled path is checked against the eager one in tests/losses/test_compiled.py.
os.environ.setdefault("EAOPD_COMPILE", "0")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
