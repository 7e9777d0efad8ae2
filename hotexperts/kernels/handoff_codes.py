"""Values the decode handoff's device kernels (handoff_triton.py), its torch path (handoff.py), the host side
(experts/mailbox.py) and the native worker (csrc/cpu_worker.cpp: `err` codes) agree on."""

ERR_TIMEOUT = 2         # mailbox err: a device wait for the worker's result ran past its deadline
GPU_SHARE = 4           # default: the GPU takes one miss per GPU_SHARE misses of a layer (at most gpu_misses)
LARGE_EXPERT_BYTES = 32 << 20   # ... one per 2 misses for experts this large (their PCIe read streams)
MAX_STEP_TOKENS = 16    # tokens a mailbox row holds: a decode step's 1, a verify step's 2..16 (MAX_VERIFY_T)
