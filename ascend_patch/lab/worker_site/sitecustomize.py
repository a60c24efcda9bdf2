"""Put on a benchmark server's PYTHONPATH only: see ascend_patch/lab/worker_hooks.py."""

import os

if os.environ.get("BENCH_ENGINE_TIMERS"):
    from ascend_patch.lab.worker_hooks import install_from_env

    install_from_env()
