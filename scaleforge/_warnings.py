"""The warning policy of every scaleforge process, in one list.

A warning that this project's own code causes is fixed where it is caused (e.g. by passing the
argument a dependency asks for), never listed here. What is listed comes from a dependency and
cannot be removed at any call of ours: each entry names the dependency, the warning, and why it is
ignored rather than fixed.

`install()` runs first in every process that trains or serves a command: the `orchestrate`
command line (scaleforge.cli), each rank (scaleforge.pretrain.__main__, started by torchrun or
srun, and the checkpoint writer megatron spawns from it, which re-imports that module). The test
suite applies the same list through tests/conftest.py (pytest resets the filters around every
test, so filters installed by an import would not hold there).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple


class Ignored(NamedTuple):
    category: type[Warning]
    message: str  # a regular expression matched at the start of the warning's text (no ':')
    module: str  # a regular expression matched at the start of the module name that warns
    lineno: int = 0  # the line that warns, where the module warns the same text elsewhere too


IGNORED: tuple[Ignored, ...] = (
    # megatron-core 0.16, on import of its layer specs, optimizer and FSDP modules: it looked for
    # Apex and Transformer Engine (GPU kernels, never installed on CPU, optional on GPU) and falls
    # back to torch's own norm, optimizers and multi-tensor helpers. Nothing to fix.
    Ignored(UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed", r"megatron\..*"),
    # megatron-core 0.16.1: RowParallelLinear.forward calls
    # linear_with_grad_accumulation_and_async_allreduce without its own tp_group (layers.py line
    # 713 warns; every layer we build is given its group, see arch.common.mlp). Only that line is
    # ignored, so a layer built without its group still warns; another megatron version shows it
    # again, to be looked at.
    Ignored(DeprecationWarning, r"Warning. tp_group is None, using default tp group",
            r"megatron\.core\.tensor_parallel\.layers", 713),
    # torch 2.13, on import of torch._inductor, which megatron's `jit_fuser` (torch.compile as a
    # decorator, applied when megatron.core.fusions is imported) pulls in: torch.utils.mkldnn
    # still defines its modules with torch's own deprecated `torch.jit.script_method`.
    Ignored(DeprecationWarning, r"`torch.jit.script_method` is deprecated", r"torch\.jit\..*"),
    # megatron-core 0.16, on import of megatron.core.inference (which its GPTModel imports) and
    # of multi_latent_attention (which its layer specs import): notices about its own module
    # layout. Raised by megatron's imports of itself, not by any call of ours.
    Ignored(DeprecationWarning, r"The following imports from `dynamic_context.py`",
            r"megatron\.core\.inference\.contexts.*"),
    Ignored(DeprecationWarning, r"The 'megatron.core.transformer.custom_layers.transformer_engine'",
            r"megatron\..*"),
    # megatron-core 0.16.1's SharedExpertMLP (MoE with a shared expert) builds its MLP without
    # ffn_hidden_size (it sets config.ffn_hidden_size to the shared expert's size just before, so
    # the default is right; megatron's own TODO there). No call of ours builds that MLP.
    Ignored(DeprecationWarning, r"MLP requires ffn_hidden_size",
            r"megatron\.core\.transformer\.moe\.shared_experts"),
    # megatron-core 0.16, on every config with selective recompute (parallel.recompute: selective
    # recomputes core attention, megatron's default module): a note that Transformer Engine's fused
    # attention need not be recomputed. On CPU and with the local attention it is the point.
    Ignored(UserWarning, r"If you are using transformer_engine as the transformer implementation",
            r"megatron\.core\.transformer\.transformer_config"),
    # megatron-core 0.16 with tensor parallelism: a CUDA tuning hint (CUDA_DEVICE_MAX_CONNECTIONS)
    # printed whatever the device. On CPU it has no meaning.
    Ignored(UserWarning, r"When using async grad allreduce it is recommended",
            r"megatron\.core\.tensor_parallel\.layers"),
    Ignored(UserWarning, r"When using sequence parallelism it is recommended",
            r"megatron\.core\.tensor_parallel\.layers"),
    # megatron-core 0.16.1 with data parallelism (dp > 1): its param-and-grad buffers reduce-scatter
    # grads and all-gather params through torch.distributed calls torch 2.13 renamed (`*_single`),
    # and its optimizer's zero_grad reads `.grad` of the buffer's non-leaf views, which torch
    # flags. All inside megatron's distributed data parallel; no call of ours reaches them.
    Ignored(FutureWarning, r"`torch.distributed.all_gather_into_tensor` is deprecated",
            r"torch\.distributed\..*"),
    Ignored(FutureWarning, r"`torch.distributed.reduce_scatter_tensor` is deprecated",
            r"torch\.distributed\..*"),
    Ignored(UserWarning, r"The .grad attribute of a Tensor that is not a leaf Tensor",
            r"megatron\.core\.optimizer\.optimizer"),
    # torch 2.13 via transformers 5: `orchestrate export` of an MoE without a shared expert
    # writes Qwen2MoE with a zero-width shared expert (transformers has no switch to leave it
    # out); building it on the meta device runs torch's init on its empty weights, which says it
    # does nothing. transformers re-installs torch's init functions inside from_config, so no
    # context of ours (no_init_weights) can skip it.
    Ignored(UserWarning, r"Initializing zero-element tensors is a no-op", r"torch\..*"),
    # Resuming a checkpoint: megatron's dist-checkpointing loads through torch.distributed.
    # checkpoint's deprecated `load_state_dict` and ShardedTensor, which torch announces as
    # deprecated. Issue 20 replaces these APIs; until then the notice says nothing actionable here.
    Ignored(FutureWarning, r"`load_state_dict` is deprecated",
            r"megatron\.core\.dist_checkpointing\..*"),
    Ignored(FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
            r"torch\.distributed\..*"),
)


def install() -> None:
    """Put the policy in front of this process's warning filters."""
    for item in IGNORED:
        warnings.filterwarnings("ignore", message=item.message, category=item.category,
                                module=item.module, lineno=item.lineno)


def pytest_filters() -> list[str]:
    """The policy as pytest `filterwarnings` lines (action:message:category:module:lineno)."""
    return [f"ignore:{item.message}:{item.category.__name__}:{item.module}:{item.lineno}"
            for item in IGNORED]
