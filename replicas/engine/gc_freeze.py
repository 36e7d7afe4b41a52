"""Keeps Python's cyclic garbage collector off the step loop's back.

A serving process holds hundreds of thousands of long-lived objects (modules, parameters,
tokenizer tables). Every full collection walks all of them: measured on the simulated-device
benchmark, full collections cost about 100 ms each and stalled whole batches of steps.
`freeze_startup_objects` collects once and moves everything alive into the permanent generation
(as vLLM's engine core does after start-up), so later collections only walk what requests
create. Called where a process becomes a server (an attention worker replica), not by the
offline `LLM`, whose caller may build and drop engines: frozen objects in a reference cycle are
never collected.
"""

from __future__ import annotations

import atexit
import gc

_unfreeze_registered = False


def freeze_startup_objects() -> int:
    """Collects, then freezes what survived; returns how many objects are frozen. At exit
    they are unfrozen, so the interpreter's last collection still finalizes them."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True
    return gc.get_freeze_count()
