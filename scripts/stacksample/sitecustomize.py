"""Where each process's main thread spends a benchmark's timed pass (bench.py --stack-sample DIR).

A poor man's py-spy for a GPU host that has none: bench.py puts this folder on PYTHONPATH, so every
Python process of the run (vLLM's engine core, replicas) loads it at start. With FLAMINGO_STACK_SAMPLE
set, a daemon thread samples the main thread's innermost frames every few milliseconds while the file
DIR/on exists, and when it goes writes the counts to DIR/<pid>.json. The samples need the GIL: time in
C code that holds it is credited to the frame that called it, after a delay. Not part of flamingo.
"""

from __future__ import annotations

import os

DEPTH = 12
INTERVAL_S = 0.005


def start(folder: str) -> None:
    import collections
    import json
    import sys
    import threading
    import time

    main = threading.main_thread().ident
    flag = os.path.join(folder, "on")

    def frames() -> str:
        f = sys._current_frames().get(main)
        out = []
        while f is not None and len(out) < DEPTH:
            code = f.f_code
            out.append(f"{code.co_name} ({os.path.basename(code.co_filename)}:{f.f_lineno})")
            f = f.f_back
        return " < ".join(out) or "-"

    def run() -> None:
        counts: collections.Counter[str] = collections.Counter()
        while True:
            if os.path.exists(flag):
                for _ in range(20):  # the flag is checked every 20 samples
                    counts[frames()] += 1
                    time.sleep(INTERVAL_S)
                continue
            if counts:
                name = ""
                try:
                    with open(f"/proc/{os.getpid()}/comm") as fh:
                        name = fh.read().strip()
                except OSError:
                    pass
                record = {"pid": os.getpid(), "name": name, "samples": sum(counts.values()), "stacks": counts}
                path = os.path.join(folder, f"{os.getpid()}.json")
                with open(path + ".tmp", "w") as fh:
                    json.dump(record, fh)
                os.replace(path + ".tmp", path)
                counts = collections.Counter()
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True, name="stack-sampler").start()


if os.environ.get("FLAMINGO_STACK_SAMPLE"):
    start(os.environ["FLAMINGO_STACK_SAMPLE"])
    # a forked child (vLLM's engine core when nothing touched CUDA first) keeps no thread but the one
    # that forked: start its own sampler
    os.register_at_fork(after_in_child=lambda: start(os.environ["FLAMINGO_STACK_SAMPLE"]))
