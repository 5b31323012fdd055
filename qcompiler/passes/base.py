"""The pass API: what a researcher implements to add a pass.

A pass is a small class:

    @register
    class MyPass(Pass):
        name = "mypass"                      # what --passes takes
        requires = frozenset({"captured"})   # IR properties that must hold before it runs
        produces = frozenset({"annotated"})  # properties that hold after it
        forbids = frozenset()                # properties that must NOT hold yet (e.g. float-only passes)
        Options = MyOptions                  # frozen dataclass; parsed from `mypass:key=value`

        def run(self, gm, ctx) -> PassResult: ...

`run` receives one decoder layer's GraphModule and its `LayerContext` (calibration inputs, options,
the place to record artifact tensors) and returns `PassResult(gm, modified, stats)`. `modified` must be
truthful: the dump instrument writes a file only for passes that changed the graph, and the pass
manager verifies the graph after each pass. Passes never parse strings at run time: options arrive as
the pass's frozen `Options` dataclass, validated when the pipeline is built.
"""
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..ir.capture import LayerInputs


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class LinearArtifact:
    """What lowering decided for one quantized Linear: its artifact type and tensors (by suffix)."""
    quant_type: str
    tensors: dict[str, torch.Tensor]


@dataclass
class LayerContext:
    """Everything a pass may use for one decoder layer."""
    index: int
    inputs: LayerInputs                 # calibration inputs of this layer (outputs of quantized layers before)
    dtype: torch.dtype                  # model dtype of the compile
    exclude: tuple[str, ...] = ()       # regexes: matching Linears (full HF names) stay float
    batch_size: int = 8                 # sequences per forward when running calibration data
    pipeline: tuple = ()                # every Pass of the pipeline, in order (a pass may look ahead,
                                        # e.g. gptq reads the bits/group of the scheme that follows it)
    artifact: dict[str, LinearArtifact] = field(default_factory=dict)  # linear name -> tensors
    records: dict[str, Any] = field(default_factory=dict)              # per-pass report data
    # artifact tensors that belong to no Linear's quant type (kv8's C8, fa3's FAQuant): name inside the
    # layer ("self_attn.k_proj.kv_cache_scale") -> (tensor, description type)
    extra_tensors: dict[str, tuple] = field(default_factory=dict)
    # top-level description keys a pass sets (kv_cache_type, kv_quant_type, fa_quant_type)
    description: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.index}."

    def run_layer(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        """Run `gm` over every calibration sequence (in batches); returns the stacked outputs."""
        from ..model import run_layer_batched
        return run_layer_batched(gm, self.inputs.hidden, self.inputs.position_embeddings, self.batch_size)


class Pass:
    """Base class; see the module docstring for the contract."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    forbids: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions
    #: artifact quant type a scheme pass assigns (targets check it before work); None for other passes
    quant_type: ClassVar[str | None] = None
    #: internal passes are appended by the driver, not named by users
    internal: ClassVar[bool] = False

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def run(self, gm: torch.fx.GraphModule, ctx: LayerContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.options})"
