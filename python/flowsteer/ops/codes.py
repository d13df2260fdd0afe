"""The integer codes of the ops' options, shared by the public functions, the sampler and every
backend (the C++ side reads the same numbers: csrc/include/flowsteer/sde_args.h)."""
import torch

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KIND_CODE = {"ode": 0, "flow": 1, "dance": 2, "cps": 3}
KIND_NAME = {code: name for name, code in KIND_CODE.items()}
LP_FORM = {"exact": 0, "flow_grpo": 1}
KL_FORM = {None: 0, "flow_grpo": 1, "exact": 2}
STD_MODE = {"group": 0, "global": 1, "none": 2}
