"""Command line: ``gg-notebook demo | verify FILE.py[:NAME] | examples``.

Exit codes of ``verify``: 0 proved, 1 refuted, 2 unknown or assumed (every output related, but only
under assumptions such as ``random="identity"``: not a proof), 3 error (including usage errors, so that
a script never mistakes a typo for an "unknown" verdict). ``demo`` exits 0 when the correct example is
proved and the buggy one is not, 1 otherwise, 3 on error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

EXIT_PROVED, EXIT_REFUTED, EXIT_UNKNOWN, EXIT_ERROR = 0, 1, 2, 3
# "assumed" (proved only under assumptions) is not a proof: it exits like "unknown"
_EXIT_BY_STATUS = {"proved": EXIT_PROVED, "refuted": EXIT_REFUTED, "unknown": EXIT_UNKNOWN, "assumed": EXIT_UNKNOWN}

DEMO_EXAMPLE, DEMO_FALLBACK, DEMO_BUG, DEMO_WORLD_SIZE = "gpt_block", "mlp", "missing_allreduce", 2
FACTORY_NAMES = ("problem", "make_problem")


class CliError(Exception):
    """An error whose message is already a complete sentence for the user (no traceback needed)."""


# --------------------------------------------------------------------------------------------------
# indirections that tests replace


def _verify(problem: Any) -> Any:
    """``gg_notebook.verify`` looked up at call time, so the engine (or a test fake) can replace it."""
    import gg_notebook

    # progress bars on an interactive terminal only (not when piped, not under tests)
    options = {"progress": True} if sys.stderr.isatty() else {}
    return gg_notebook.verify(problem, **options)


def _load_examples() -> Any:
    return importlib.import_module("gg_notebook.examples")


# --------------------------------------------------------------------------------------------------
# loading a problem from a file


def split_target(target: str) -> tuple[Path, str | None]:
    """``"dir/f.py:NAME"`` -> (Path("dir/f.py"), "NAME"); ``"dir/f.py"`` -> (Path, None)."""
    head, sep, tail = target.rpartition(":")
    if sep and head and tail.isidentifier():
        return Path(head), tail
    return Path(target), None


def import_file(path: Path):
    """Import ``path`` as a fresh module, with its directory first on ``sys.path``."""
    if not path.exists():
        raise CliError(f"{path}: no such file.")
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a Python file, e.g. {path}/model.py[:NAME].")
    path = path.resolve()
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    mod_name = f"gg_user_{path.stem}" if path.stem.isidentifier() else "gg_user_module"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"{path}: cannot be imported as a Python module (is it a .py file?).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses, pickling and relative lookups need it registered
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def _problem_type():
    from gg_notebook.problem import Problem

    return Problem


def _candidates(module) -> tuple[list[str], list[str]]:
    """Module-level Problem instances, and factory functions named ``problem``/``make_problem``."""
    Problem = _problem_type()
    instances = [n for n, v in vars(module).items() if isinstance(v, Problem) and not n.startswith("_")]
    factories = [
        n for n in FACTORY_NAMES
        if callable(getattr(module, n, None)) and not isinstance(getattr(module, n), Problem)
    ]
    return instances, factories


def find_problem(module, path: Path, name: str | None):
    """The problem the user means: attribute ``name`` (called if callable), else the single one."""
    Problem = _problem_type()
    instances, factories = _candidates(module)
    if name is not None:
        if not hasattr(module, name):
            found = ", ".join(instances + factories) or "none"
            raise CliError(
                f"{path} has no attribute {name!r} (problems and problem factories found there: {found})."
            )
        obj, label = getattr(module, name), name
    elif len(instances) == 1:
        obj, label = getattr(module, instances[0]), instances[0]
    elif len(instances) > 1:
        raise CliError(
            f"{path} defines {len(instances)} gg.Problem objects ({', '.join(instances)}); "
            f"pick one with {path}:NAME."
        )
    elif len(factories) == 1:
        obj, label = getattr(module, factories[0]), factories[0]
    elif len(factories) > 1:
        raise CliError(
            f"{path} defines both {' and '.join(factories)}; pick one with {path}:NAME."
        )
    else:
        raise CliError(
            f"{path} defines no gg.Problem at module level and no function named "
            f"{' or '.join(FACTORY_NAMES)}; define one, or name it with {path}:NAME."
        )
    if callable(obj) and not isinstance(obj, Problem):
        required = _required_params(obj)
        if required:
            raise CliError(
                f"{path}:{label} is a function of ({', '.join(required)}), not a gg.Problem nor a "
                f"function without arguments returning one."
            )
        obj = obj()
    if not isinstance(obj, Problem):
        raise CliError(
            f"{path}:{label} is a {type(obj).__name__}, not a gg.Problem (nor a function returning one)."
        )
    return obj, label


def _required_params(fn) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def load_problem(target: str):
    """``FILE.py[:NAME]`` -> (problem, label)."""
    path, name = split_target(target)
    module = import_file(path)
    return find_problem(module, path, name)


# --------------------------------------------------------------------------------------------------
# output


def _status_value(result) -> str:
    status = result.status
    return str(getattr(status, "value", status))


def exit_code(result) -> int:
    return _EXIT_BY_STATUS.get(_status_value(result), EXIT_ERROR)


def _print_report(text: str, status: str | None = None) -> None:
    """Print a report; colour its first line when writing to a terminal and rich is installed."""
    if status is not None and sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        try:
            from rich.console import Console
            from rich.text import Text
        except ImportError:
            pass
        else:
            colour = {"proved": "green", "assumed": "dark_orange", "refuted": "red", "unknown": "yellow"}.get(status, "")
            first, _, rest = text.partition("\n")
            console = Console(highlight=False)
            console.print(Text(first, style=f"bold {colour}"))
            if rest:
                console.print(Text(rest))
            return
    print(text)


def _error(message: str, exc: BaseException | None, show_traceback: bool) -> int:
    if show_traceback and exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"gg-notebook: {message}", file=sys.stderr)
    return EXIT_ERROR


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` without a trailing period (the caller ends the sentence)."""
    text = str(exc).strip().rstrip(".")
    if isinstance(exc, CliError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# commands


def cmd_verify(args) -> int:
    target = args.target
    label = split_target(target)[1] or "(the module's problem)"
    try:
        problem, label = load_problem(target)
    except CliError as exc:
        return _error(str(exc), exc, args.traceback)
    except Exception as exc:  # the user's module failed to import or the factory raised
        hint = "" if args.traceback else " Run with --traceback for the full traceback."
        return _error(
            f"could not load problem {label} from {target}: {_describe(exc)}.{hint}", exc, args.traceback
        )
    try:
        result = _verify(problem)
    except Exception as exc:
        hint = "" if args.traceback else " Run with --traceback for the full traceback."
        name = getattr(problem, "name", None) or label
        return _error(
            f"verifying problem {name!r} ({label} in {split_target(target)[0]}) failed: "
            f"{_describe(exc)}.{hint}",
            exc,
            args.traceback,
        )
    if args.json:
        print(result.to_json(indent=2))
    else:
        _print_report(str(result), _status_value(result))
    return exit_code(result)


def _get_example(examples, name: str):
    try:
        return examples.get(name)
    except (LookupError, ValueError):
        return None


def cmd_demo(args) -> int:
    try:
        examples = _load_examples()
        chosen = DEMO_EXAMPLE
        example = _get_example(examples, chosen)
        if example is None:
            chosen = DEMO_FALLBACK
            example = _get_example(examples, chosen)
        if example is None:
            raise CliError(f"neither built-in example {DEMO_EXAMPLE!r} nor {DEMO_FALLBACK!r} exists.")
        cases = []
        for bug in (None, DEMO_BUG):
            kwargs = {"world_size": args.world_size}
            if bug is not None:
                kwargs["bug"] = bug
            problem = example.make(**kwargs)
            cases.append((bug, _verify(problem)))
    except Exception as exc:
        hint = "" if args.traceback else " Run with --traceback for the full traceback."
        return _error(f"demo failed: {_describe(exc)}.{hint}", exc, args.traceback)

    (_, good), (_, bad) = cases
    ok = _status_value(good) == "proved" and _status_value(bad) != "proved"
    if args.json:
        print(json.dumps({
            "example": chosen,
            "world_size": args.world_size,
            "ok": ok,
            "cases": [{"bug": bug, "result": r.to_dict()} for bug, r in cases],
        }, indent=2))
    else:
        for bug, result in cases:
            title = f"== {chosen}, world_size={args.world_size}, " + (f"bug={bug}" if bug else "correct")
            print(title)
            _print_report(str(result), _status_value(result))
            print()
        print(
            "demo ok: the correct program is proved and the buggy one is not."
            if ok else
            "demo FAILED: expected the correct program to be proved and the buggy one not to be."
        )
    return 0 if ok else 1


def _example_names(examples) -> list[str]:
    for attr in ("names", "list", "available"):
        fn = getattr(examples, attr, None)
        if callable(fn):
            return list(fn())
    for attr in ("EXAMPLES", "REGISTRY", "examples", "registry"):
        reg = getattr(examples, attr, None)
        if isinstance(reg, dict):
            return list(reg)
    raise CliError("gg_notebook.examples exposes no list of examples (names() or EXAMPLES).")


def _bugs(example) -> list[tuple[str, str]]:
    bugs = getattr(example, "bugs", None) or {}
    if isinstance(bugs, dict):
        return [(str(k), _bug_text(v)) for k, v in bugs.items()]
    return [(str(getattr(b, "name", b)), _bug_text(b)) for b in bugs]


def _bug_text(bug) -> str:
    """A bug's one-line description: a string, or an object with ``.description``."""
    if isinstance(bug, str):
        return bug
    text = getattr(bug, "description", None)
    return text.strip().splitlines()[0] if isinstance(text, str) and text.strip() else ""


def _summary(example) -> str:
    for attr in ("description", "summary", "doc"):
        text = getattr(example, attr, None)
        if isinstance(text, str) and text.strip():
            return text.strip().splitlines()[0]
    make = getattr(example, "make", None)
    doc = getattr(make, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def cmd_examples(args) -> int:
    try:
        examples = _load_examples()
        rows = []
        for name in _example_names(examples):
            example = examples.get(name)
            rows.append({"name": name, "description": _summary(example), "bugs": _bugs(example)})
    except Exception as exc:
        return _error(f"cannot list examples: {_describe(exc)}.", exc, args.traceback)
    if args.json:
        print(json.dumps(
            [{**r, "bugs": [{"name": b, "description": d} for b, d in r["bugs"]]} for r in rows], indent=2
        ))
        return 0
    for r in rows:
        print(f"{r['name']}" + (f"  - {r['description']}" if r["description"] else ""))
        for bug, desc in r["bugs"]:
            print(f"    bug={bug}" + (f"  - {desc}" if desc else ""))
    return 0


# --------------------------------------------------------------------------------------------------
# parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 3, never 2 (= "unknown")
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from gg_notebook import __version__

    parser = _Parser(
        prog="gg-notebook",
        description="Prove that a distributed PyTorch program refines its single-device specification.",
    )
    parser.add_argument("--version", action="version", version=f"gg-notebook {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("verify", help="verify the gg.Problem defined in FILE.py[:NAME]",
                       description="Exit codes: 0 proved, 1 refuted, 2 unknown or assumed (proved only under "
                                   "assumptions, e.g. random=\"identity\": not a proof), 3 error.")
    p.add_argument("target", metavar="FILE.py[:NAME]",
                   help="a Python file; NAME is a gg.Problem or a function returning one (default: the "
                        "single module-level gg.Problem, or a function named problem/make_problem)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="verify a built-in example, correct and with a bug")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--world-size", type=int, default=DEMO_WORLD_SIZE, help="ranks (default 2)")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("examples", help="list the built-in examples and their bugs")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    p.set_defaults(func=cmd_examples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
