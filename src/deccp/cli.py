"""The `deccp` command: parse arguments, call the library, print results. Errors are one clear line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from deccp import DeccpError, __version__


def _cmd_model_path(args: argparse.Namespace) -> int:
    from deccp.models import resolve_model

    print(resolve_model(args.model, keep_parts=args.keep_parts, revision=args.revision))
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from deccp.data.validate import validate_paths

    problems, counts = validate_paths(args.paths or None)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("ok: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from deccp.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.data_dir)
    print(json.dumps(stats, ensure_ascii=False, indent=2) if args.json else format_stats(stats))
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deccp.judges import LLMJudge, judge_file

    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_name(src.stem + ".judged.jsonl")
    use_llm = args.llm_url or args.llm_model or os.environ.get("DECCP_JUDGE_URL")
    llm = LLMJudge(base_url=args.llm_url, model=args.llm_model) if use_llm else None
    counts = judge_file(src, out, llm=llm)
    total = sum(counts.values()) or 1
    for label, n in counts.items():
        print(f"{label:<16} {n:>6}  {n / total:6.1%}")
    print(f"wrote {out}")
    return 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from deccp.mining import main as mine_main

    return mine_main(args.rest)


def _cmd_train(args: argparse.Namespace) -> int:
    from deccp.training import main as train_main

    return train_main(args.command, args.rest)


def _cmd_merge(args: argparse.Namespace) -> int:
    from deccp.training import merge_main

    return merge_main(args.rest)


def _cmd_eval(args: argparse.Namespace) -> int:
    from deccp.evaluation import main as eval_main

    return eval_main(args.rest)


def _cmd_abliterate(args: argparse.Namespace) -> int:
    from deccp.abliteration.run import main as abliterate_main

    return abliterate_main(args.rest)


def _cmd_run(args: argparse.Namespace) -> int:
    from deccp.pipeline import main as pipeline_main

    return pipeline_main(args.rest)


def _cmd_publish(args: argparse.Namespace) -> int:
    from deccp.publish import main as publish_main

    return publish_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deccp", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"deccp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("model-path", help="print the local directory of a ready-to-load model, fetching it first")
    p.add_argument("model", nargs="?", default=None,
                   help="default | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b | Hub id | local dir | .gguf file")
    p.add_argument("--keep-parts", action="store_true", help="keep the assembled .gguf after conversion")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.set_defaults(func=_cmd_model_path)

    data = sub.add_parser("data", help="dataset tools: validate, stats, mine")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("validate", help="check dataset files; prints file:line: field: problem")
    p.add_argument("paths", nargs="*", help="files or directories (default: the bundled data/)")
    p.set_defaults(func=_cmd_data_validate)
    p = dsub.add_parser("mine", help="on-policy data: judge the model's own answers (KTO/DPO rows)", add_help=False)
    p.set_defaults(func=_cmd_mine, passthrough=True)
    p = dsub.add_parser("stats", help="counts per kind and language")
    p.add_argument("--json", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=_cmd_data_stats)

    p = sub.add_parser("judge", help="label answers (JSONL of prompt, answer[, lang, id]) with refusal and label")
    p.add_argument("file")
    p.add_argument("--out", default=None, help="default: FILE.judged.jsonl")
    p.add_argument("--llm-url", default=None, help="OpenAI-compatible endpoint for the optional LLM judge "
                                                   "(or DECCP_JUDGE_URL)")
    p.add_argument("--llm-model", default=None, help="model name at that endpoint (or DECCP_JUDGE_MODEL)")
    p.set_defaults(func=_cmd_judge)

    for kind in ("sft", "dpo", "kto"):
        p = sub.add_parser(kind, help=f"{kind.upper()} with TRL (same as train/{kind}.py; --config RECIPE …)",
                           add_help=False)
        p.set_defaults(func=_cmd_train, passthrough=True)
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base: ADAPTER OUT [--base SPEC]", add_help=False)
    p.set_defaults(func=_cmd_merge, passthrough=True)

    p = sub.add_parser("eval", help="evaluate models (refusal, CCP alignment, factuality, KL, capability); "
                                     "--config RECIPE, --model, --base, --output_dir …", add_help=False)
    p.set_defaults(func=_cmd_eval, passthrough=True)

    p = sub.add_parser("abliterate", help="find the censorship direction and remove it from the weights",
                       add_help=False)
    p.set_defaults(func=_cmd_abliterate, passthrough=True)

    p = sub.add_parser("run", help="run a pipeline recipe (abliterate, mine, realign, eval, publish); resumable: "
                                   "RECIPE [--output_dir DIR] [--validate] [--dry-run]", add_help=False)
    p.set_defaults(func=_cmd_run, passthrough=True)
    p = sub.add_parser("publish", help="upload a publish folder (FOLDER --repo-id ID --push, token from HF_TOKEN) "
                                       "or build one (build --model … --output_dir …)", add_help=False)
    p.set_defaults(func=_cmd_publish, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = extra  # the entry point parses its own recipe and --key value overrides
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DeccpError as exc:
        print(f"deccp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deccp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
