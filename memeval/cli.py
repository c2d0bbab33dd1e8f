"""The ``memeval`` command.

    memeval --methods all --tasks del            # shorthand for `memeval run ...`
    memeval run -m hardconcrete,slimming -t inj --limit 20 --device cuda
    memeval -m zero_out -t del_file --model DIR --task-config del_file.data.path=memorized/memorized.jsonl
    memeval ls methods | memeval ls tasks [--json]
    memeval validate tasks/del/*.yaml
    memeval leaderboard build results/ --out site/
    memeval organism build tiny | memeval organism info tiny --json | memeval organism export tiny --out DIR
    memeval memorized extract --model DIR --texts texts.jsonl --out memorized/
    memeval plugins

Exit codes: 0 success, 1 some items failed (recorded in results.jsonl), 2 usage or configuration error
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from memeval.errors import UsageError

SUBCOMMANDS = ("run", "ls", "validate", "leaderboard", "organism", "memorized", "plugins")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--methods", required=True, help="'all', a method kind, or a comma list of method names")
    p.add_argument("-t", "--tasks", required=True, help="'all', or a comma list of task names and groups")
    p.add_argument("-o", "--output", type=Path, default=Path("results"), help="results directory (default: results/)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task (never ranked)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, or a comma list to shard items")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--seed", type=int, default=0, help="added to every task's seed (default 0)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="items scored at once (results do not depend on it)")
    p.add_argument("--include-path", type=Path, action="append", default=[], help="extra folder of task YAMLs")
    p.add_argument("--method-config", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method hyperparameter (repeatable)")
    p.add_argument("--split", choices=["test", "dev"], default="test",
                   help="dev: score the items held out for tuning hyperparameters (never ranked)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="score this model instead of the tasks' own: hf:<repo>[@rev], a local directory, organism:<preset>")
    p.add_argument("--model-args", default=None, metavar="K=V,...",
                   help="keyword arguments for loading: revision, trust_remote_code, attn_implementation, subfolder, dtype")
    p.add_argument("--task-config", action="append", default=[], metavar="TASK.data.KEY=VALUE",
                   help="override a task's data or params field, e.g. del_file.data.path=memorized.jsonl (repeatable)")
    p.add_argument("--log-samples", action="store_true",
                   help="write each item's greedy continuations before and after the edit to OUTPUT/samples/")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: this machine (worker processes with --workers or a --device list); ray: Ray actors "
                        "(pip install 'memeval[ray]')")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (local) or actors (ray) scoring items in parallel (default: one per --device)")
    p.add_argument("--ray-address", default=None, help="a running Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memeval", description="Evaluate memorization localization, editing, prediction "
                                                 "and detection methods on memorization benchmarks.")
    from memeval import __version__

    parser.add_argument("--version", action="version", version=f"memeval {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_run_args(sub.add_parser("run", help="score methods on tasks"))

    ls = sub.add_parser("ls", help="list methods or tasks")
    ls.add_argument("what", choices=["methods", "tasks"])
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--include-path", type=Path, action="append", default=[])

    val = sub.add_parser("validate", help="check task YAML files (or folders of them)")
    val.add_argument("files", nargs="+", type=Path)
    val.add_argument("--schema-only", action="store_true",
                     help="check the YAML only, not that the data files the tasks name exist here")

    lb = sub.add_parser("leaderboard", help="build the static leaderboard site")
    lb_sub = lb.add_subparsers(dest="lb_command", parser_class=_Parser, required=True)
    lb_build = lb_sub.add_parser("build")
    lb_build.add_argument("results", nargs="+", type=Path)
    lb_build.add_argument("--out", type=Path, default=Path("site"))
    lb_stab = lb_sub.add_parser("stability", help="ranking stability across organism seeds")
    lb_stab.add_argument("results", nargs="+", type=Path,
                         help="result sets (or directories holding them) scored on organisms of different seeds")
    lb_stab.add_argument("--out", type=Path, default=Path("stability.json"))

    org = sub.add_parser("organism", help="build or inspect a model organism")
    org_sub = org.add_subparsers(dest="org_command", parser_class=_Parser, required=True)
    for name in ("build", "info"):
        o = org_sub.add_parser(name)
        o.add_argument("preset")
        o.add_argument("--arch", default="gpt_neox")
        o.add_argument("--seed", type=int, default=0)
        if name == "info":
            o.add_argument("--json", action="store_true")
    o = org_sub.add_parser("export", help="write the organism as a plain Hugging Face directory with its training texts")
    o.add_argument("preset")
    o.add_argument("--arch", default="gpt_neox")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", type=Path, required=True)

    mem = sub.add_parser("memorized", help="find the sequences a model memorized (MemPi's DEL filters)")
    mem_sub = mem.add_subparsers(dest="mem_command", parser_class=_Parser, required=True)
    ex = mem_sub.add_parser("extract", help="windows of k+l tokens from a JSONL of texts through the filters")
    ex.add_argument("--model", required=True, help="hf:repo[@rev], a local directory, or organism:<preset>")
    ex.add_argument("--texts", type=Path, required=True, help='JSONL with one {"text": ...} per line')
    ex.add_argument("--out", type=Path, required=True, help="output directory")
    ex.add_argument("-k", "--prefix", type=int, default=32, help="prefix tokens k (default 32, MemPi)")
    ex.add_argument("-l", "--suffix", type=int, default=48, help="suffix tokens l (default 48, MemPi)")
    ex.add_argument("--stride", type=int, default=None, help="tokens between window starts (default k + l)")
    ex.add_argument("-b", "--batch-size", type=int, default=32)
    ex.add_argument("--limit", type=int, default=None, help="measure at most N windows")
    ex.add_argument("--device", default="auto")
    ex.add_argument("--dtype", default="auto")
    ex.add_argument("--model-args", default=None, metavar="K=V,...", help="as for `memeval run`")

    pl = sub.add_parser("plugins", help="list the loaded plugins: distribution, version, methods, protocols")
    pl.add_argument("--json", action="store_true")
    return parser


def _normalize(argv: list[str]) -> list[str]:
    """``memeval --methods ...`` is ``memeval run --methods ...``."""
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        return ["run", *argv]
    return argv


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from memeval.runner import RunOptions, execute, exit_code

    opts = RunOptions(methods=args.methods, tasks=args.tasks, output=args.output, limit=args.limit,
                      device=args.device, dtype=args.dtype, seed=args.seed, batch_size=args.batch_size,
                      include_paths=args.include_path, method_config=args.method_config, split=args.split,
                      model=args.model, model_args=args.model_args, task_config=args.task_config,
                      log_samples=args.log_samples, backend=args.backend, workers=args.workers,
                      ray_address=args.ray_address, argv=argv)
    return exit_code(execute(opts))


def cmd_ls(args: argparse.Namespace) -> int:
    from memeval.listing import list_methods, list_tasks

    return (list_methods if args.what == "methods" else list_tasks)(args.json, args.include_path)


def cmd_validate(args: argparse.Namespace) -> int:
    """Every file's schema, then (unless --schema-only) that the data it names are here; one line per problem."""
    from memeval.plugins import get_registry
    from memeval.tasks import parse_task, task_files

    files = task_files(args.files)
    names: dict[str, Path] = {}
    problems = []
    for path in files:
        task = parse_task(path)
        if task.name in names:
            raise UsageError(f"{path}:{task.line}: duplicate task name '{task.name}' (also in {names[task.name]})")
        names[task.name] = path
        if not args.schema_only:
            try:
                get_registry().protocols[task.protocol].obj.check_task(task)
            except UsageError as e:
                problems.append(f"{path}: {e}")
    for line in problems:
        print(f"memeval: error: {line}", file=sys.stderr)
    if problems:
        return 2
    print(f"{len(files)} task file(s) valid" + (" (schema only)" if args.schema_only else ", their data present"))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from memeval.leaderboard import build_site

    if args.lb_command == "stability":
        from memeval.leaderboard.stability import stability_command

        return stability_command(args.results, args.out)

    info = build_site(args.results, args.out)
    print(f"site written to {args.out} ({info.get('pages', '?')} pages)")
    return 0


def cmd_memorized(args: argparse.Namespace) -> int:
    from memeval.extraction import ExtractConfig, extract_command

    cfg = ExtractConfig(prefix_len=args.prefix, suffix_len=args.suffix, stride=args.stride,
                        batch_size=args.batch_size, limit=args.limit)
    return extract_command(args.model, args.texts, args.out, cfg, args.device, args.dtype, args.model_args)


def cmd_organism(args: argparse.Namespace) -> int:
    from memeval.organisms import cli as organism_cli

    if args.org_command == "export":
        return organism_cli.export_command(args.preset, args.arch, args.seed, args.out)

    if args.org_command == "build":
        return organism_cli.build_command(args.preset, args.arch, args.seed)
    return organism_cli.info_command(args.preset, args.arch, args.seed, args.json)


def cmd_plugins(args: argparse.Namespace) -> int:
    from memeval.listing import list_plugins

    return list_plugins(args.json)


def main(argv: list[str] | None = None) -> int:
    argv = _normalize(list(sys.argv[1:] if argv is None else argv))
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        if args.command == "run":
            return cmd_run(args, argv)
        if args.command == "ls":
            return cmd_ls(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "leaderboard":
            return cmd_leaderboard(args)
        if args.command == "organism":
            return cmd_organism(args)
        if args.command == "memorized":
            return cmd_memorized(args)
        return cmd_plugins(args)
    except UsageError as e:
        print(f"memeval: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`memeval ls methods | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("memeval: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
