"""The pass API: what a researcher implements to add a pass.

A pass is a small class:

    @register
    class MyPass(Pass):
        name = "mypass"                      # what --passes takes
        requires = frozenset({CAPTURED})     # IR properties that must hold before it runs
        produces = frozenset({ANNOTATED})    # properties that hold after it (facts, passes/properties.py)
        forbids = frozenset()                # properties that must NOT hold yet (e.g. float-only passes)
        phase = Phase.QUANTIZE               # when it runs: ANNOTATE, TRANSFORM or QUANTIZE (below)
        Options = MyOptions                  # frozen dataclass; parsed from `mypass:key=value`

        def run(self, gm, ctx) -> PassResult: ...

`run` receives one decoder layer's GraphModule and its `LayerContext` (calibration inputs, options,
the place to record artifact tensors) and returns `PassResult(gm, modified, stats)`. `modified` must be
truthful: the dump instrument writes a file only for passes that changed the graph, and the pass
manager verifies the graph after each pass. Passes never parse strings at run time: options arrive as
the pass's frozen `Options` dataclass, validated when the pipeline is built.

Decide, then transform (PT2E's order). `validate()` checks `requires` / `forbids` in the order the user
wrote (`--passes smooth,w8a8`: smooth before w8a8, in msModelSlim's sense); the PassManager then runs the
passes phase by phase, keeping the user's order inside a phase:
  ANNOTATE   scheme passes (w8a8, w4a16, w16a16s, ...): they only decide, writing `meta.QUANT_SPEC` (or
             `meta.FLOAT_QUANT_TYPE`) on the Linears they claim; the first to claim a Linear wins.
  TRANSFORM  float transforms (smooth, awq, gptq, sparse): they change float weights and read how each
             Linear will be quantized from its node's `meta.QUANT_SPEC` (no spec: the Linear stays float).
  QUANTIZE   everything that works on the annotated, final float graph (kv8, fa3, simulate_tp, fallback)
             and the internal tail (observe, calibrate, lower).
So no pass simulates which scheme will claim a Linear; the checks before any work that must know it use
`group_size.first_claim` (the same rule SchemePass.run applies).
"""
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..calibration.linear_inputs import refuse_while_pending
from ..ir.capture import LayerInputs


class Phase(enum.IntEnum):
    """When a pass runs inside one layer's pipeline (see the module docstring); a lower value runs first."""
    ANNOTATE = 0
    TRANSFORM = 1
    QUANTIZE = 2


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
    # quant type -> dtypes the target's engines cast a routed expert's weight scale through after the model dtype
    # (the driver hands backends/ascend/encode.EXPERT_SCALE_ALSO); passes that choose codes round to them too
    expert_scale_also: dict = field(default_factory=dict)
    artifact: dict[str, LinearArtifact] = field(default_factory=dict)  # linear name -> tensors
    records: dict[str, Any] = field(default_factory=dict)              # per-pass report data
    # artifact tensors that belong to no Linear's quant type (kv8's C8, fa3's FAQuant): name inside the
    # layer ("self_attn.k_proj.kv_cache_scale") -> (tensor, description type)
    extra_tensors: dict[str, tuple] = field(default_factory=dict)
    # top-level description keys a pass sets (kv_cache_type, kv_quant_type, fa_quant_type)
    description: dict[str, str] = field(default_factory=dict)
    # rewrites waiting for statistics of the final float graph (kv8 / fa3 scales): their observers ride the
    # calibrate pass's one calibration forward, which applies them (calibration/forward.py PendingRewrite)
    pending: list = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.index}."

    def defer(self, rewrite) -> None:
        """Queue a `calibration.forward.PendingRewrite`: its observers are in the graph, its `finish` runs in
        the calibrate pass's forward once they have seen every calibration sequence (passes/kv8.py)."""
        self.pending.append(rewrite)

    def run_layer(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        """Run `gm` over every calibration sequence (in batches); returns the stacked outputs.
        RuntimeError while rewrites are pending: their observers would see this forward too (settle them first:
        calibration.forward.settle_pending)."""
        from ..model import run_layer_batched
        refuse_while_pending(self)
        return run_layer_batched(gm, self.inputs.hidden, self.inputs.position_embeddings, self.batch_size)


class Pass:
    """Base class; see the module docstring for the contract."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    forbids: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions
    #: when the PassManager runs it (Phase); the default suits passes that need the annotated float graph
    phase: ClassVar[Phase] = Phase.QUANTIZE
    #: artifact quant type a scheme pass assigns (targets check it before work); None for other passes
    quant_type: ClassVar[str | None] = None
    #: internal passes are appended by the driver, not named by users
    internal: ClassVar[bool] = False
    #: capability: the pass migrates activation outliers into the weights (smooth), so static int8 activations
    #: need no outlier policy (policy.py's `auto` reads this, never a pass name)
    migrates_outliers: ClassVar[bool] = False

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def run(self, gm: torch.fx.GraphModule, ctx: LayerContext) -> PassResult:
        raise NotImplementedError

    def check_model(self, passes: list, config: dict, exclude: tuple) -> None:
        """Before any work: QCError when this pass cannot do its job on this model with this pipeline (`config`:
        config.json as a dict; `exclude`: --exclude regexes with the policy's). Default: nothing to check."""

    #: a model-wide pass: the driver calls `presweep` once before any layer compiles (fallback measures every
    #: layer there), and `restore` when a resumed compile continues
    model_wide: ClassVar[bool] = False

    def presweep(self, passes: list, skeleton, inputs, ckpt, exclude: tuple, batch_size: int,
                 log=None, expert_scale_also: dict | None = None) -> tuple["Pass", dict]:
        """Model-wide work before the layers compile (model_wide passes only). `passes`: the whole pipeline
        (this pass among them), `skeleton` / `inputs`: ir/capture.py's HFSkeleton and layer 0's calibration
        inputs, `ckpt`: the checkpoint, `expert_scale_also`: LayerContext.expert_scale_also of the compile.
        Returns (the pass to run on every layer, its report: JSON-able, written to the compile report under the
        pass's name and into the resume state)."""
        raise NotImplementedError(f"pass {self.name} has no model-wide pre-sweep")

    def restore(self, report: dict) -> "Pass":
        """The pass `presweep` returned, rebuilt from its report (a resumed compile does not measure again)."""
        raise NotImplementedError(f"pass {self.name} has no model-wide pre-sweep")

    def __repr__(self):
        return f"{type(self).__name__}({self.options})"
