"""One process-wide lock around building torch modules from weights (loads, adapter injection).

diffusers, transformers and peft construct models under `accelerate.init_empty_weights` and
transformers' init patches, which swap torch globals (`nn.Module.register_parameter`,
`nn.Parameter`, init functions) for the duration of a load. Two loads in different threads of
one process see each other's patches: in the embedded `atelier serve` a worker starting a job
while inference attaches a LoRA got meta tensors or `Parameter.__new__() got an unexpected
keyword argument '_is_hf_initialized'` (8 of 10 training loads failed in a two-thread
reproduction; the job attempt fails and burns a retry). Loads are short next to training and
generation, so serialising them costs nothing measurable; the lock is reentrant so a load may
call another.
"""

from __future__ import annotations

import threading

MODEL_LOAD_LOCK = threading.RLock()
