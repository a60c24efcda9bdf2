"""One round of the apply race (test_session.py): run as a fresh interpreter.

argv: a directory holding `race_toy.py` and the configs a.yaml and b.yaml (both patch
race_toy:greet, with prefixes A and B). Eight threads, half asking for each config, are
released at a barrier; each imports the loader (this interpreter's first import of it) and
applies its config from its own environment. Prints one JSON line: what each thread was told
and what is in effect afterwards.
"""

import json
import sys
import threading

where = sys.argv[1]
sys.path.insert(0, where)
THREADS = 8
paths = [f"{where}/a.yaml", f"{where}/b.yaml"]
start = threading.Barrier(THREADS)
told: list = [None] * THREADS


def work(i: int) -> None:
    env = {"ASCEND_PATCH_CONFIG": paths[i % 2], "ASCEND_PATCH_LOG_LEVEL": "ERROR"}
    start.wait()
    try:
        from ascend_patch.core.runtime import apply_from_env

        records = apply_from_env(env)
        told[i] = {"asked": paths[i % 2], "ok": [r.options["prefix"] for r in records]}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        told[i] = {"asked": paths[i % 2], "error": type(exc).__name__, "message": str(exc)}


threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()

import race_toy  # noqa: E402 - after the race

from ascend_patch.core.patcher import PATCHER  # noqa: E402

print(json.dumps({"told": told, "effective": str(PATCHER.config.path) if PATCHER.config else None,
                  "greet": race_toy.greet("x")}))
