"""Shared code of the e2e tests (real SmolLM2-135M): paths into ../shared, the skip mark, the conformance
checker and vLLM-Ascend's loader as subprocesses. Fixtures live in tests/e2e/conftest.py; test modules import
from here (tests/test_helpers_layout.py)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CHECKER, SHARED, make_tiny_model, write_calib_file

CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
LOADER = SHARED / "tools" / "loader_check" / "vllm_ascend_load.py"


#: every e2e module: pytestmark = NEEDS_SHARED
NEEDS_SHARED = pytest.mark.skipif(not (SHARED / "models" / "get_models.py").is_file(), reason="needs ../shared")

#: the whole-model w8a8 artifacts (with and without down_proj in float) that test_smollm2.py evaluates and runs
#: and test_engines_load.py loads: their tests run in one pytest-xdist worker, which compiles them once
SMOLLM2_W8A8 = ("w8a8", "w8a8-down-float")


def artifact_group(name: str):
    """The xdist_group mark of the tests that read the e2e artifact `name` (test_engines_load.ARTIFACTS): the
    `compiled` fixture's cache is per process, so tests of one artifact in two workers would compile it twice."""
    return pytest.mark.xdist_group("e2e-artifact-w8a8" if name in SMOLLM2_W8A8 else f"e2e-artifact-{name}")


def compile_tiny_cases(root: Path, arch: str, cases: dict) -> dict:
    """{name: OUT} of a tiny `arch` checkpoint (tests.helpers.make_tiny_model) compiled with each case's passes,
    4 x 32 calibration tokens."""
    from qcompiler import cli
    model = make_tiny_model(root / arch, arch)
    calib = write_calib_file(root / "calib.jsonl")
    outs = {}
    for name, passes in cases.items():
        outs[name] = root / name
        assert cli.main([str(model), "--passes", passes, "--calib", str(calib), "--calib-samples", "4",
                         "--seq-len", "32", "-o", str(outs[name])]) == 0
    return outs


def run_checker(out: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    return r.returncode, r.stdout


def loader_runner(loader: Path = LOADER):
    """run(out, engine="0.23.0", tp=None) -> (exit code, output) of vLLM-Ascend's own loader on `out` (CPU, torch_npu
    stubbed; ../shared/tools/loader_check); `tp`: its --tp (e.g. "1,2"; default the tool's).

    The tool needs PyPI once per engine to fill its cache (`--setup-only`). When that set-up exits 2 (the tool
    could not run: no network on a CI machine, README "Output and exit code"), the calling test is skipped, not
    failed. Any other set-up failure is a failure. Once set up, every exit code of the real run is returned to
    the test (an exit 2 there means bad usage or an unsupported model: the test's assertion reports it)."""
    if not loader.is_file():
        pytest.skip(f"{loader} absent")
    ready = set()

    def run(out: Path, engine: str = "0.23.0", tp: str | None = None):
        if engine not in ready:
            r = subprocess.run([sys.executable, str(loader), "--setup-only", "--engine", engine, str(out)],
                               capture_output=True, text=True)
            tail = (r.stdout + r.stderr)[-500:]
            if r.returncode == 2:
                pytest.skip(f"vLLM-Ascend loader check {engine} cannot set itself up (exit 2): {tail}")
            if r.returncode != 0:
                pytest.fail(f"vLLM-Ascend loader check {engine} --setup-only exited {r.returncode}: {tail}")
            ready.add(engine)
        r = subprocess.run([sys.executable, str(loader), "--engine", engine, str(out)] + (["--tp", tp] if tp else []),
                           capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        return r.returncode, r.stdout + r.stderr
    return run


#: the scripts below that adapt the tool's engine and then run its inner check are _INNER_HEAD + the body defining
#: `init(self, device)` (which calls real_init) + _INNER_TAIL; the body may also take arguments off `argv`
_INNER_HEAD = """
import importlib.util, sys
tool_dir, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, tool_dir)
import va_harness as H  # installs the tool's torch_npu stand-ins before any vllm import
real_init = H.Engine.__init__
"""
_INNER_TAIL = """
H.Engine.__init__ = init
import vllm_ascend_load as L
sys.argv = ["vllm_ascend_load.py", "--inner", *argv]
L.main()
"""

#: run by the tool's own venv python: loader_check's inner check with one vLLM-Ascend worker patch executed first
_PATCHED_INNER = _INNER_HEAD + """
patch, argv = argv[0], argv[1:]
def init(self, device):
    import vllm_ascend
    path = f"{vllm_ascend.__path__[0]}/patch/worker/{patch}.py"
    spec = importlib.util.spec_from_file_location(f"vllm_ascend_worker_{patch}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    real_init(self, device)  # reads <Model>ForCausalLM.load_weights after the patch re-bound it
""" + _INNER_TAIL

#: run by the tool's own venv python: loader_check's inner check on a qwen2_moe artifact, with vLLM-Ascend's quant
#: config given a qwen2_moe entry in modelslim_config.py `packed_modules_model_mapping`: qkv_proj and gate_up_proj
#: as vLLM's Qwen2MoeForCausalLM.packed_modules_mapping holds them once its __init__ has run (gate_up_proj is added
#: there when shared_expert_intermediate_size > 0; the tool's stand-in tree does not run that __init__), and the
#: `experts` rule of the release's own qwen3_moe entry. Everything else (the W8A8_DYNAMIC / W4A8_DYNAMIC fused-MoE
#: schemes, vLLM's FusedMoE.weight_loader, Qwen2MoeModel.load_weights with its expert-params mapping, the shared
#: expert's parallel Linears) is the tool's real code path.
_QWEN2_MOE_INNER = _INNER_HEAD + """
H.MODEL_TYPES = H.MODEL_TYPES + ("qwen2_moe",)
def init(self, device):
    real_init(self, device)
    from vllm_ascend.quantization import modelslim_config as M
    qwen3_moe = M.packed_modules_model_mapping["qwen3_moe"]
    M.packed_modules_model_mapping["qwen2_moe"] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
        "experts": list(qwen3_moe["experts"])}
""" + _INNER_TAIL


#: run by the tool's own venv python: loader_check's inner check with the C8 routing of vLLM-Ascend 0.23.0's
#: patch/worker/patch_gqa_c8.py (`_patched_causal_lm_load_weights`) bound to Qwen3MoeForCausalLM as well; the
#: release binds it to Qwen3ForCausalLM / Glm4MoeForCausalLM / MiniMaxM2ForCausalLM only
_QWEN3_MOE_C8_INNER = _INNER_HEAD + """
def init(self, device):
    import vllm_ascend
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
    path = f"{vllm_ascend.__path__[0]}/patch/worker/patch_gqa_c8.py"
    spec = importlib.util.spec_from_file_location("vllm_ascend_worker_patch_gqa_c8", path)
    patch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patch)
    original = Qwen3MoeForCausalLM.load_weights
    Qwen3MoeForCausalLM.load_weights = lambda self, weights: patch._patched_causal_lm_load_weights(
        self, weights, original)
    real_init(self, device)  # reads Qwen3MoeForCausalLM.load_weights after the re-binding
""" + _INNER_TAIL

#: run by the tool's own venv python: build the tool's model tree (vLLM-Ascend's real fused-MoE schemes and vLLM's
#: real FusedMoE.weight_loader) at each (tp, rank), fill every floating-point routed-expert parameter with NaN, load
#: every tensor of the artifact through the model's load_weights, and print how many entries of each parameter of
#: layer 0's experts are still NaN: what the engine's loader left as torch.empty memory. The tool itself checks
#: which parameters a tensor was routed to and the tensor's shape, not which entries were written.
_UNFILLED_INNER = """
import json, logging, sys
tool_dir, out, tps = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
sys.path.insert(0, tool_dir)
logging.disable(logging.ERROR)
import torch
import va_harness as H
eng, art = H.Engine("910b"), H.Artifact(out)
result = {}
for tp in tps:
    for rank in sorted({0, tp - 1}):
        model, errors = eng.build(art, tp, rank)
        assert not errors, errors
        params = {n: p for n, p in model.named_parameters() if ".layers.0.mlp.experts." in n
                  and p.dtype.is_floating_point}
        with torch.no_grad():
            for p in params.values():
                p.data.fill_(float("nan"))
        for name, tensor in art.iter_tensors():
            model.load_weights([(name, tensor)])
        result[f"{tp}r{rank}"] = {n.rsplit(".", 1)[1]: [int(torch.isnan(p.data).sum()), p.numel()]
                                  for n, p in params.items()}
print("UNFILLED " + json.dumps(result))
"""


def loader_unfilled_expert_params(out: Path, tps: str = "1,2", engine: str = "0.23.0",
                                  loader: Path = LOADER) -> dict:
    """{"<tp>r<rank>": {layer 0 expert parameter (w13_weight_scale, w2_weight_scale, ...): [entries vLLM's loader
    left unwritten, entries]}} for the qwen3_moe artifact `out`, floating-point parameters only (`_UNFILLED_INNER`).
    Call after loader_runner's run set `engine` up."""
    rc, text = _run_inner(_UNFILLED_INNER, [out, tps], engine, loader)
    line = next((l for l in text.splitlines() if l.startswith("UNFILLED ")), None)
    assert rc == 0 and line, text[-3000:]
    return json.loads(line[len("UNFILLED "):])


def _run_inner(script: str, args: list, engine: str, loader: Path) -> tuple[int, str]:
    """(exit code, output) of `script` run by the loader tool's venv python with `args`, in the tool's cache and
    environment as its main() sets them up; call after loader_runner's run set `engine` up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("qc_loader_check_tool", loader)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cache, roots, py = tool.setup(engine)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(roots),
               PYTHONPYCACHEPREFIX=os.path.join(cache, "pycache"), VLLM_LOGGING_LEVEL="ERROR",
               VLLM_VERSION=tool.ENGINES[engine][1]["version"],
               TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
    r = subprocess.run([py, "-c", script, str(loader.parent), *map(str, args)], capture_output=True, text=True,
                       env=env)
    return r.returncode, r.stdout + r.stderr


def loader_with_worker_patch(out: Path, patch: str, engine: str = "0.23.0", loader: Path = LOADER):
    """(exit code, output) of the loader check on `out` with vLLM-Ascend's worker patch
    `vllm_ascend/patch/worker/<patch>.py` executed first, as the engine does on start (worker/worker.py
    NPUWorker.__init__ -> utils.py adapt_patch imports vllm_ascend.patch.worker). The tool applies none of those
    patches (its README, "What runs for real, what is stubbed"). Only that one file runs: the package's
    __init__ imports every worker patch, some of which need modules the tool's venv does not hold. Uses the
    tool's cache, venv and environment as its main() does; call after loader_runner's run set `engine` up."""
    return _run_inner(_PATCHED_INNER, [patch, out, "--tp", "auto", "--device", "auto"], engine, loader)


def loader_with_qwen2_moe_mapping(out: Path, engine: str = "0.23.0", loader: Path = LOADER):
    """(exit code, output) of the loader check on the qwen2_moe artifact `out`, with one adaptation
    (`_QWEN2_MOE_INNER`): vLLM-Ascend 0.23.0 has no qwen2_moe entry in modelslim_config.py
    `packed_modules_model_mapping`, so its AscendModelSlimConfig.get_quant_method looks up
    `<layer>.mlp.experts.weight` for the FusedMoE module and raises KeyError on any quantized routed experts (an
    engine limit: the tool exits 2 for qwen2_moe). Given the qwen3_moe entry's `experts -> experts.0.*` rule, the
    engine's own MoE weight loading runs on the artifact's per-expert tensors. Call after loader_runner's run set
    `engine` up."""
    return _run_inner(_QWEN2_MOE_INNER, [out, "--tp", "auto", "--device", "auto"], engine, loader)


def loader_with_qwen3_moe_c8_routing(out: Path, engine: str = "0.23.0", loader: Path = LOADER):
    """(exit code, output) of the loader check on the qwen3_moe C8 artifact `out`, with the C8 scale routing of
    patch_gqa_c8.py bound to Qwen3MoeForCausalLM (`_QWEN3_MOE_C8_INNER`): the routing 0.23.0 gives qwen3, and that
    0.26.0rc1 gives every model through its quant config's get_cache_scale_mapper (applied by vLLM 0.26's
    AutoWeightsLoader, which Qwen3MoeForCausalLM.load_weights uses there; the tool builds MoE with 0.23.0 only).
    Call after loader_runner's run set `engine` up."""
    return _run_inner(_QWEN3_MOE_C8_INNER, [out, "--tp", "auto", "--device", "auto"], engine, loader)


def first_layers(model: Path, layers: int, dest: Path) -> Path:
    """A copy of the checkpoint folder `model` cut to its first `layers` decoder layers, in `dest`: config.json's
    num_hidden_layers set to `layers`, the tensors of `model.layers.<i>.` for i >= layers left out of the
    safetensors, every other file copied as is. Same widths, vocabulary, tokenizer and head as the real model, so
    an artifact compiled from it has the real tensor names, shapes and dtypes of those layers (what the checker
    and the engines' loaders read), at a fraction of the compile and load time. Reads safetensors and JSON
    only."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    dest.mkdir(parents=True)
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    for f in sorted(model.iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as src:
                keep = {k: src.get_tensor(k) for k in src.keys()
                        if (m := layer.match(k)) is None or int(m.group(1)) < layers}
            save_file(keep, str(dest / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["num_hidden_layers"] = layers
            (dest / f.name).write_text(json.dumps(cfg, indent=2))
        elif f.is_file():
            shutil.copyfile(f, dest / f.name)
    return dest
