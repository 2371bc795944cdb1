"""The `lorainit` command.

Exit codes: 0 done; 2 bad input (one line on stderr naming the problem, nothing saved changed);
1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from lorainit.errors import BadInput


def _cmd_demo(args: argparse.Namespace) -> int:
    from lorainit.demo import format_result, run_demo, run_story

    if not args.quick:
        run_story(args.out, data_dir=args.data_dir)
        return 0
    result = run_demo(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      data_dir=args.data_dir)
    print(format_result(result))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from lorainit import models
    from lorainit.engine.lora import LoRAConfig, LoRAPack, adaptable_names

    resolved = models.resolve(args.spec)
    model, _, fresh = models.load_with_fresh(args.spec, args.kind, num_labels=args.num_labels)
    names = adaptable_names(model)
    leaves = sorted({n.rpartition(".")[2] for n in names})
    print(f"{args.spec} -> {resolved.path}{' (hub)' if resolved.from_hub else ''}")
    if models.about(args.spec):
        print(f"weights: {models.about(args.spec)}")
    print(f"class: {type(model).__name__}; parameters: {sum(p.numel() for p in model.parameters()):,}")
    if fresh:
        print(f"not in the checkpoint, drawn per run from its seed: {', '.join(fresh)}")
    print(f"linear module names ({len(names)} layers): {', '.join(leaves)}")
    if args.targets:
        pack = LoRAPack(model, LoRAConfig(rank=args.rank, targets=tuple(args.targets.split(","))), num_runs=1)
        print(f"LoRA rank {args.rank} on {len(pack.layers)} layers; head: {pack.head_name or 'none'}; "
              f"trainable parameters per run: {pack.trainable_per_run():,}")
    return 0


def _cmd_theory(args: argparse.Namespace) -> int:
    import json

    from lorainit.theory import calculus as theory

    if args.json:
        print(json.dumps(theory.to_json(), indent=2))
        return 0
    inits = (args.init,) if args.init else ("a", "b")
    if args.lr_exponent is not None:
        if not math.isfinite(args.lr_exponent):
            raise BadInput(f"--lr-exponent must be a finite number such as -0.5, got {args.lr_exponent}")
        rows = [theory.exponents(init, -args.lr_exponent) for init in inits]
    else:
        rows = theory.table(inits)
    print(theory.format_table(rows))
    for init in inits:
        print(f"Init[{init.upper()}]: largest stable learning rate Theta(n^{-float(theory.max_stable_c(init)):g})")
    if args.check:
        for optimizer in ("adam", "signsgd") if args.optimizer == "both" else (args.optimizer,):
            print()
            print(theory.format_check(theory.check(optimizer)))
    return 0


def _numbers(text: str, kind, option: str) -> tuple:
    """A comma-separated list of numbers; '2^-3' is accepted for powers of two."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInput(f"{option} is empty: give a comma-separated list")
    out = []
    for item in items:
        try:
            value = 2.0 ** float(item[2:]) if item.startswith("2^") else float(item)
        except ValueError:
            raise BadInput(f"{option}: {item!r} is not a number") from None
        if kind is int:
            if value != int(value):
                raise BadInput(f"{option}: {item!r} is not an integer")
            value = int(value)
        out.append(value)
    return tuple(out)


def _cmd_toy(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch

    from lorainit.theory import toy, toy_report

    fields = dict(toy.PRESETS[args.preset])
    if args.widths is not None:
        fields["widths"] = _numbers(args.widths, int, "--widths")
    if args.lrs is not None:
        fields["lrs"] = _numbers(args.lrs, float, "--lrs")
    if args.inits is not None:
        fields["inits"] = tuple(i.strip() for i in args.inits.split(",") if i.strip())
    for name in ("seeds", "steps", "rank", "batch_size", "device"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if fields.get("device", "auto") == "auto":
        fields["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = toy.ToyConfig(**fields)
    cfg.validate()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {cfg.device}: no CUDA device is available here")
    out = Path(args.out)
    configs = cfg.seeds * len(cfg.inits) * len(cfg.lrs)
    print(f"toy: widths {list(cfg.widths)}, {len(cfg.lrs)} lrs x {len(cfg.inits)} inits x {cfg.seeds} seeds "
          f"= {configs} configurations per width, {cfg.steps} steps of batch {min(cfg.batch_size, cfg.n_train)}")
    if args.edge_rounds < 0:
        raise BadInput(f"--edge-rounds must be >= 0, got {args.edge_rounds}")
    t0 = time.perf_counter()
    summary, figures = toy_report.run(cfg, out, args.edge_rounds, show_progress=not args.quiet)
    print(toy_report.format_summary(summary, cfg.inits))
    if "edge" in summary:
        from lorainit.theory import toy_edge

        print(toy_edge.format_slopes(summary["edge"], args.edge_rounds))
    print(f"wrote {out / 'toy_results.csv'}, {out / 'optimal_lr.csv'}, {out / 'slopes.json'} "
          f"({time.perf_counter() - t0:.0f} s)")
    print("figures: " + ", ".join(str(f) for f in figures))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from lorainit.config import RunConfig
    from lorainit.sweeps import driver

    given = {name: getattr(args, name) for name in RunConfig.field_names() if getattr(args, name) is not None}
    relative_to = None
    if "task" in given:
        given["task"], relative_to = _task_option(given["task"])
    run = RunConfig.from_dict(given, where="lorainit train", relative_to=relative_to)
    given = {k: v for k, v in run.to_dict().items() if k in given}  # typed, as a sweep file would hold them
    if run.data is not None:  # the declared task as a sweep file would hold it, its paths resolved
        given["task"] = {"type": run.task, **json.loads(run.data)}
    return driver.run_sweep(driver.sweep_of_one(run, given), args.out, device=args.device,
                            show_progress=not args.quiet)


def _cmd_advise(args: argparse.Namespace) -> int:
    from lorainit import advise
    from lorainit.config import RunConfig

    base = {name: getattr(args, name) for name in RunConfig.field_names() if getattr(args, name) is not None}
    if set(base) & set(advise.SET_BY_ADVISE):
        name = next(n for n in advise.SET_BY_ADVISE if n in base)
        raise BadInput(f"advise: {name} is set by advise; give --families, --lrs, --seeds or --target-steps")
    relative_to = None
    if "task" in base:
        base["task"], relative_to = _task_option(base["task"])
    run = RunConfig.from_dict(base | {"max_steps": max(1, args.target_steps)}, where="lorainit advise",
                              relative_to=relative_to)
    base = {k: v for k, v in run.to_dict().items() if k in base}  # typed, as a sweep file holds them
    if run.data is not None:
        base["task"] = {"type": run.task, **json.loads(run.data)}
    if args.seeds < 1:
        raise BadInput(f"--seeds is {args.seeds}; give the number of seeds, at least 1")
    if args.budget is not None and args.minutes is not None:
        raise BadInput("give --budget (run-steps) or --minutes, not both")
    settings = advise.Settings(
        base=base,
        families=tuple(t.strip() for t in args.families.split(",") if t.strip()) if args.families
        else advise.DEFAULT_FAMILIES,
        lrs=tuple(sorted(_numbers(args.lrs, float, "--lrs"))) if args.lrs else advise.DEFAULT_LRS,
        seeds=tuple(range(args.seeds)), target_steps=args.target_steps, budget=args.budget or 0,
        minutes=args.minutes, metric=args.metric, pack_size=args.pack_size, name=args.name)
    result = advise.advise(settings, args.out, device=args.device, show_progress=not args.quiet,
                           dry_run=args.dry_run, executor=args.executor, ray_address=args.ray_address)
    if result is not None:
        print("\n".join(result.lines()))
        print(f"\nreport: {args.out}/report/index.html")
        if result.best is not None:
            print(f"confirm at {settings.target_steps} steps: lorainit sweep {args.out}/confirm.yaml --out DIR")
    return 0


def _task_option(value: str):
    """--task: a task name, an inline YAML mapping ('{type: classification, train: a.csv, ...}'), or a
    YAML file holding one; returns the value and the folder its relative paths are read from."""
    import yaml
    from pathlib import Path

    path = Path(value).expanduser()
    if value.strip().startswith("{"):
        text, where, folder = value, "--task", None
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        text, where, folder = path.read_text(encoding="utf-8"), str(path), path.resolve().parent
    else:
        return value, None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise BadInput(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(mapping, dict):
        raise BadInput(f"{where}: a task is a name or a mapping with a type, got {mapping!r}")
    return mapping, folder


def _cmd_sweep(args: argparse.Namespace) -> int:
    from lorainit.sweeps import driver, file

    return driver.run_sweep(file.load(args.file), args.out, executor=args.executor, ray_address=args.ray_address,
                            device=args.device, dry_run=args.dry_run, show_progress=not args.quiet)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorainit import report
    from lorainit.report import families

    pairs = [families.parse_pair(p, "--pair") for p in args.pair or []]
    if args.compare:
        folders = [args.folder, *args.compare]
        out = args.out or f"{args.folder.rstrip('/')}/report/compare"
        path = report.compare(folders, out, pairs)
        print(f"comparison of {len(folders)} sweeps: {path}")
        return 0
    from lorainit.report import toy

    if toy.is_toy(args.folder) and not (Path(args.folder) / "store.sqlite").is_file():
        if pairs:
            raise BadInput(f"--pair: {args.folder} is a `lorainit toy` folder, which has no init families to pair")
        index, lines = toy.build(args.folder)
        print("\n".join(lines))
        print(f"\nreport: {index}")
        return 0
    built = report.build(args.folder, pairs)
    print(built.text())
    print(f"\nreport: {built.index}")
    return 0


def _field_options(parser: argparse.ArgumentParser, hidden: tuple[str, ...] = ()) -> None:
    """Every run field as an option (`--max_steps` and `--max-steps`); those in `hidden` are accepted
    but not listed, so that the command can refuse them by name."""
    from lorainit.config import RunConfig

    defaults = RunConfig()
    for name in RunConfig.field_names():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if name in hidden:
            parser.add_argument(*flags, dest=name, default=None, help=argparse.SUPPRESS)
            continue
        default = getattr(defaults, name)
        parser.add_argument(*flags, dest=name, default=None, metavar="V",
                            help=f"default {','.join(default) if isinstance(default, tuple) else default}")


def _executor_options(parser: argparse.ArgumentParser, executor_help: str) -> None:
    """--executor and --ray-address: where packs train."""
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help=executor_help)
    parser.add_argument("--ray-address", "--ray_address", dest="ray_address", default=None,
                        help="auto or HOST:PORT of a running Ray cluster (default: start a local one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorainit",
        description="LoRA finetuning with exact Init[A]/Init[B] schemes, packed sweeps and the "
                    "paper's theory (Hayou, Ghosh, Yu 2024).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="the paper's story: theory, toy, an Init[A] vs Init[B] sweep on SST-2, "
                                       "the report (--quick: one short finetune of each init)")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--quick", action="store_true",
                      help="only a short finetune of MiniLM on SST-2, Init[A] vs Init[B], reloaded in PEFT")
    demo.add_argument("--steps", type=int, default=150, help="--quick: training steps")
    demo.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                      help="rows per run per step")
    demo.add_argument("--lr", type=float, default=5e-4, help="learning rate (both runs)")
    demo.add_argument("--seed", type=int, default=0, help="seed shared by both runs")
    demo.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                      help="GLUE root holding SST-2/ (default: $LORAINIT_DATA/glue)")
    demo.set_defaults(func=_cmd_demo)

    th = sub.add_parser("theory", help="the width-exponent calculus of one LoRA module (paper §3)")
    th.add_argument("--init", choices=("a", "b"), default=None, help="one init (default: both)")
    th.add_argument("--lr-exponent", "--lr_exponent", dest="lr_exponent", type=float, default=None,
                    help="learning rate Theta(n^X), e.g. -0.5 (default: a table over X)")
    th.add_argument("--json", action="store_true", help="print JSON keyed by init instead of a table")
    th.add_argument("--check", action="store_true",
                    help="simulate the module at widths 2^8..2^14 and compare measured to predicted slopes")
    th.add_argument("--optimizer", choices=("adam", "signsgd", "both"), default="both",
                    help="optimizer(s) for --check")
    th.set_defaults(func=_cmd_theory)

    ty = sub.add_parser("toy", help="the teacher-student toy: optimal and largest stable lr against width")
    ty.add_argument("--preset", choices=("default", "paper"), default="default",
                    help="default: minutes on a laptop CPU; paper: widths to 8192, full batch (GPU)")
    ty.add_argument("--widths", default=None, help="comma-separated widths, e.g. 64,128,256")
    ty.add_argument("--lrs", default=None,
                    help="comma-separated learning rates, e.g. 2^-8,2^-7.5,1e-3, in any order: the grid is "
                         "sorted ascending and exact duplicates dropped")
    ty.add_argument("--inits", default=None, help="comma-separated inits (default a,b)")
    ty.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    ty.add_argument("--steps", type=int, default=None, help="Adam steps (default 500)")
    ty.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4)")
    ty.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                    help="training points per step (default 100; >= 1000 is full batch)")
    ty.add_argument("--device", default=None, help="auto (default: cuda when available), cpu or cuda")
    ty.add_argument("--edge-rounds", "--edge_rounds", dest="edge_rounds", type=int, default=2,
                    help="bisection rounds of each stability edge past the half-octave grid "
                         "(2: to 1/8 octave; 0: none)")
    ty.add_argument("--out", default="runs/toy", help="output folder")
    ty.add_argument("--quiet", action="store_true", help="no progress display")
    ty.set_defaults(func=_cmd_toy)

    sw = sub.add_parser("sweep", help="run or continue a sweep file (a base run and a grid) into a folder")
    sw.add_argument("file", help="the sweep file (YAML): name, base, grid, pack_size")
    sw.add_argument("--out", required=True,
                    help="the sweep folder: store.sqlite, results.csv, metrics.csv, adapters/, checkpoints/")
    sw.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                    help="print the runs, the packs and estimates of memory and time; train nothing")
    _executor_options(sw, "local: packs one after another in this process; ray: one Ray task per pack")
    sw.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sw.add_argument("--quiet", action="store_true", help="no progress display")
    sw.set_defaults(func=_cmd_sweep)

    rp = sub.add_parser("report", help="figures, findings and one self-contained page from a sweep folder's store")
    rp.add_argument("folder", help="a sweep folder (holding store.sqlite), a folder of run folders that each hold "
                                    "one (lorainit.hf.ProbeCallback's: read as one sweep) or a `lorainit toy` "
                                    "folder; writes FOLDER/report/")
    rp.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                    help="other sweep folders to put side by side with FOLDER")
    rp.add_argument("--out", default=None, help="with --compare: the output folder (default FOLDER/report/compare)")
    rp.add_argument("--pair", action="append", metavar="X:Y", default=None,
                    help="also judge init family X against Y (e.g. pissa:olora, or ab:'ab{\"reset\":false}'), "
                         "as a sweep file's compare: does; repeatable. Init[A] is judged against every family "
                         "without it")
    rp.set_defaults(func=_cmd_report)

    tr = sub.add_parser("train", help="train one LoRA run; every run field is an option (--lr, --init, ...)")
    tr.add_argument("--out", required=True, help="output folder: store.sqlite, results.csv, metrics.csv, adapters/")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--quiet", action="store_true", help="no progress display")
    _field_options(tr)
    tr.set_defaults(func=_cmd_train)

    ad = sub.add_parser("advise", allow_abbrev=False, help="each init family's best lr and the family to use, from a staged probe "
                                       "sweep within a budget; every run field but init, lr, seed and length is an option")
    ad.add_argument("--out", required=True, help="output folder: advice.md, confirm.yaml, report/, stage-<i>/")
    ad.add_argument("--target-steps", "--target_steps", dest="target_steps", type=int, required=True,
                    help="the length, in optimiser steps, you will finally train")
    ad.add_argument("--budget", type=int, default=None, help="run-steps to spend at most (one step of one run)")
    ad.add_argument("--minutes", type=float, default=None,
                    help="or a budget in minutes, converted to run-steps through the dry run's estimate")
    ad.add_argument("--families", default=None,
                    help="comma-separated init families (default: Init[A], Init[B] and the data-free families: "
                         "a,b,ab,gaussian,orthogonal,pissa,olora)")
    ad.add_argument("--lrs", default=None, help="comma-separated lr grid, e.g. 2^-16,2^-15,1e-3 "
                                                "(default: 14 octaves, 2^-18 to 2^-5)")
    ad.add_argument("--seeds", type=int, default=2, help="number of seeds (0 .. N-1; default 2)")
    ad.add_argument("--metric", default=None, help="the metric to choose by (default: the task's first)")
    ad.add_argument("--pack-size", "--pack_size", dest="pack_size", type=int, default=None,
                    help="most runs per pack (default: chosen from memory)")
    ad.add_argument("--name", default="advise", help="the name its sweeps and report carry")
    ad.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                    help="print the stages and their cost; train nothing")
    _executor_options(ad, "where each stage's packs train, as for `lorainit sweep`")
    ad.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ad.add_argument("--quiet", action="store_true", help="no progress display")
    _field_options(ad, hidden=("init", "init_args", "lr", "seed", "max_steps", "epochs"))  # advise sets these
    ad.set_defaults(func=_cmd_advise)

    model = sub.add_parser("model", help="resolve a model spec and list its linear module names")
    model.add_argument("spec", help="an alias (minilm, smollm2-135m), a local folder, or a hub id")
    model.add_argument("--kind", choices=("classification", "causal_lm", "base"), default="classification")
    model.add_argument("--num-labels", "--num_labels", dest="num_labels", type=int, default=2)
    model.add_argument("--targets", default=None, help="comma-separated LoRA targets to count parameters for")
    model.add_argument("--rank", type=int, default=8)
    model.set_defaults(func=_cmd_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except BadInput as err:
        print(f"lorainit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
