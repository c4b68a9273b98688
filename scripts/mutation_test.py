"""Mutation testing of the robustness core with mutmut: which small code changes do the fast tests miss?

mutmut rewrites one operator, constant or call at a time in the chosen modules of
``painwatch.robust`` (a *mutant*) and runs the tests that cover the mutated function; a mutant that
no test notices *survives*. A surviving mutant is either a gap in the tests (a wrong implementation
they would accept) or an equivalent mutant (a change that keeps the behaviour, e.g. a different
error message or an unused default). This script runs mutmut in a scratch copy of the repository, so
that neither the working tree nor ``pyproject.toml`` is touched, under a wall-clock limit, and writes:

- ``report.md``: the command, machine, date, settings, counts by status and every survivor's diff;
- ``summary.json``: the same counts and the status of every mutant, machine-readable.

    python scripts/mutation_test.py                                   # the default subset, 1 hour
    python scripts/mutation_test.py --modules bounds.py --tests tests/test_bound_coverage.py \\
        --time-limit 600 --out results/mutation-bounds

Needs ``mutmut`` (in the ``dev`` extra). Mutants not reached within the time limit are reported as
``not checked``; the scratch copy is deleted unless ``--keep`` is given (then ``mutmut show NAME`` and
``mutmut run NAME`` work there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MODULES = ("bounds.py", "smoothing.py", "margin.py", "sequential.py")
"""The statistics behind every smoothing radius: where a wrong constant breaks a guarantee silently."""

DEFAULT_TESTS = (
    "tests/test_bound_coverage.py",
    "tests/test_certificates.py",
    "tests/test_mutation_survivors.py",
    "tests/test_registry.py",
    "tests/test_selection_and_budget.py",
    "tests/test_sequential.py",
    "tests/test_smoothing.py",
)
"""The fast tests that exercise those modules directly (no training, a few seconds each)."""

# mutmut's status names, in the order the report lists them.
STATUSES = ("killed", "survived", "timeout", "suspicious", "no tests", "skipped", "segfault",
            "caught by type check", "not checked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), metavar="FILE",
                        help="modules of painwatch/robust to mutate (default: %(default)s)")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), metavar="PATH",
                        help="test files or node ids that may kill mutants (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=3600.0, metavar="SECONDS",
                        help="stop mutmut after this many seconds of wall clock (default: %(default)s)")
    parser.add_argument("--max-children", type=int, default=2, metavar="N",
                        help="parallel mutmut workers (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "mutation", metavar="DIR",
                        help="where report.md and summary.json go (default: results/mutation)")
    parser.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                        help="scratch copy of the repository (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy afterwards")
    parser.add_argument("--mutants-from", type=Path, default=None, metavar="FILE",
                        help="run only the mutants named in FILE, one a line (e.g. the survivors of an "
                             "earlier run, against tests added since); the others are reported as not "
                             "checked")
    parser.add_argument("--resume", action="store_true",
                        help="go on in the kept --work-dir of an earlier run that hit its time limit: only "
                             "the mutants not checked yet are run (with the code and tests copied then)")
    args = parser.parse_args(argv)
    for module in args.modules:
        if not (REPO / "painwatch" / "robust" / module).is_file():
            parser.error(f"--modules: painwatch/robust/{module} does not exist")
    for test in args.tests:
        if not (REPO / test.split("::")[0]).exists():
            parser.error(f"--tests: {test} does not exist")
    if args.resume and (args.work_dir is None or not (args.work_dir / "mutants").is_dir()):
        parser.error("--resume needs the --work-dir of an earlier run, with its mutants/ folder")
    if args.mutants_from is not None and not args.mutants_from.is_file():
        parser.error(f"--mutants-from: {args.mutants_from} does not exist")
    if args.time_limit <= 0 or args.max_children < 1:
        parser.error(f"need --time-limit > 0 and --max-children >= 1, got {args.time_limit} and "
                     f"{args.max_children}")
    return args


def toml_list(values: list[str]) -> str:
    """A TOML array of basic strings (JSON string escapes are valid TOML)."""
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def prepare_work_dir(work: Path, modules: list[str], tests: list[str], max_children: int) -> None:
    """Copy the package and the tests into ``work`` and add mutmut's settings to its pyproject.toml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(REPO / "painwatch", work / "painwatch", ignore=ignore)
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    if "[tool.mutmut]" in pyproject:
        raise SystemExit("pyproject.toml already has a [tool.mutmut] table; this script writes its own")
    settings = "\n".join([
        "",
        "[tool.mutmut]",
        'source_paths = ["painwatch"]',
        f"only_mutate = {toml_list([f'painwatch/robust/{module}' for module in modules])}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        # -p no:cacheprovider: the workers must not write pytest's cache into the copy concurrently.
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]',
        # torch is not fork-safe once it has run: fork workers from a server that only imported it.
        'process_isolation = "forkserver"',
        "use_git_change_detection = false",
        "",
    ])
    (work / "pyproject.toml").write_text(pyproject + settings, encoding="utf-8")


def run_mutmut(work: Path, max_children: int, time_limit: float, log: Path,
               mutants: list[str] | None = None) -> tuple[float, bool]:
    """Run ``mutmut run`` in ``work`` (only ``mutants`` when given) for at most ``time_limit`` seconds:
    (seconds, whether it finished)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PAINWATCH_TEST_THREADS="1", OMP_NUM_THREADS="1")
    start = time.monotonic()
    with log.open("a", encoding="utf-8") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *(mutants or [])],
            cwd=work, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            process.wait(timeout=time_limit)
            finished = process.returncode == 0
        except subprocess.TimeoutExpired:
            # mutmut saves each result as it comes: stopping it keeps everything checked so far.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            finished = False
    return time.monotonic() - start, finished


def mutant_statuses(work: Path) -> dict[str, str]:
    """Every generated mutant and its status, from ``mutmut results --all true``."""
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True, check=True).stdout
    statuses = {}
    for line in listing.splitlines():
        match = re.fullmatch(r"\s*(\S+): (.+?)\s*", line)
        if match:
            statuses[match.group(1)] = match.group(2)
    return statuses


def mutant_diff(work: Path, name: str) -> str:
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                           text=True, check=False)
    return (shown.stdout or shown.stderr).strip()


_STRING_LITERAL = re.compile(r"""[rbfuRBFU]{0,2}("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


def changes_only_a_string(diff: str) -> bool:
    """True when the mutant only rewrites, drops or replaces by None a string literal (an error message
    or the name a check puts in one): such a mutant changes no number a certificate is made of."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if not removed or len(removed) != len(added):
        return False
    def same_but_strings(old: str, new: str) -> bool:
        old, new = _STRING_LITERAL.sub('""', old), _STRING_LITERAL.sub('""', new)
        # A string argument replaced by None, or dropped, is the same kind of change (a name in a message).
        variants = (old, old.replace('""', "None", 1), old.replace(', ""', "", 1), old.replace('""', "", 1))
        return new in variants

    return all(same_but_strings(old, new) for old, new in zip(removed, added, strict=True))


def machine_description() -> dict[str, object]:
    import torch  # only for its version; the tests import it anyway

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(value, 2) for value in load] if load else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mutmut": _package_version("mutmut"),
    }


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    described = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "painwatch", "tests"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{described}{' (with uncommitted changes)' if dirty else ''}"


def write_report(out: Path, *, command: str, commit: str, statuses: dict[str, str], diffs: dict[str, str],
                 sittings: list[dict[str, object]], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(statuses.values())
    by_module: dict[str, Counter] = {}
    for name, status in statuses.items():
        module = name.split(".x")[0].split(".xǁ")[0]
        by_module.setdefault(module, Counter())[status] += 1
    machine = machine_description()
    summary = {
        "command": command,
        "commit": commit,
        "sittings": sittings,
        "wall_seconds": round(sum(float(s["wall_seconds"]) for s in sittings), 1),
        "finished_within_time_limit": bool(sittings[-1]["finished"]),
        "modules": [f"painwatch/robust/{module}" for module in args.modules],
        "tests": list(args.tests),
        "max_children": args.max_children,
        "time_limit_s": args.time_limit,
        "machine": machine,
        "counts": dict(sorted(counts.items())),
        "counts_by_module": {module: dict(sorted(c.items())) for module, c in sorted(by_module.items())},
        "survivors_rewriting_only_a_string": sorted(
            name for name, status in statuses.items()
            if status == "survived" and changes_only_a_string(diffs.get(name, ""))),
        "mutants": dict(sorted(statuses.items())),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    checked = sum(counts[s] for s in ("killed", "survived", "timeout", "suspicious", "segfault"))
    killed = counts["killed"] + counts["timeout"] + counts["segfault"]
    lines = [
        "# Mutation testing of painwatch.robust (mutmut)",
        "",
        "Written by `scripts/mutation_test.py`; see `README.md` beside it for what the survivors mean.",
        "",
        f"- **Command**: `{command}`",
        f"- **Code**: commit {summary['commit']}",
        "- **Date**: " + "; ".join(
            f"{s['started']} ({float(s['wall_seconds']) / 60:.1f} min, "
            f"{'finished' if s['finished'] else 'stopped at the time limit'})" for s in sittings),
        f"- **Machine**: {machine['platform']}, {machine['cpu_count']} CPU cores, "
        f"Python {machine['python']}, "
        f"torch {machine['torch']}, mutmut {machine['mutmut']}, {args.max_children} workers; "
        f"load average at the end {machine['load_average_at_end']}",
        f"- **Mutated**: {', '.join(summary['modules'])}",
        f"- **Tests**: {', '.join(args.tests)} (the default `-m 'not slow'` selection)",
        f"- **Score**: {killed} of {checked} checked mutants killed"
        + (f" ({100 * killed / checked:.1f} %)" if checked else ""),
        "",
        "| module | " + " | ".join(STATUSES) + " |",
        "|---|" + "---|" * len(STATUSES),
    ]
    for module, module_counts in sorted(by_module.items()):
        lines.append(f"| {module} | " + " | ".join(str(module_counts[s]) for s in STATUSES) + " |")
    lines.append("| **all** | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    survivors = sorted(n for n, s in statuses.items() if s == "survived")
    string_only = [name for name in survivors if changes_only_a_string(diffs.get(name, ""))]
    lines += ["", f"## Surviving mutants ({len(survivors)}, of which {len(string_only)} only rewrite a "
              "string literal)", ""]
    for name in survivors:
        tag = " (string literal only)" if name in string_only else ""
        lines += [f"### `{name}`{tag}", "", "```diff", diffs.get(name, "(no diff)"), "```", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def recorded_command(arguments: list[str]) -> str:
    """The command line as the report shows it: paths outside the repository (the scratch copy) become
    ``SCRATCH``, paths inside it are relative."""
    shown = []
    for argument in arguments:
        path = Path(argument)
        if path.is_absolute():
            resolved = path.resolve()
            argument = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else "SCRATCH"
        shown.append(argument)
    return " ".join(["python scripts/mutation_test.py", *shown])


def record_sitting(work: Path, *, started: str, seconds: float, finished: bool) -> list[dict[str, object]]:
    """Append this sitting to ``sittings.json`` in the scratch copy and return every sitting so far."""
    log = work / "sittings.json"
    sittings = json.loads(log.read_text(encoding="utf-8")) if log.exists() else []
    sittings.append({"started": started, "wall_seconds": round(seconds, 1), "finished": finished})
    log.write_text(json.dumps(sittings, indent=2) + "\n", encoding="utf-8")
    return sittings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = recorded_command(sys.argv[1:] if argv is None else list(argv))
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="painwatch-mutation-"))
    if args.resume:
        commit = (work / "commit.txt").read_text(encoding="utf-8").strip()
    else:
        if args.work_dir is not None and work.exists() and any(work.iterdir()):
            raise SystemExit(f"--work-dir {work} is not empty")
        commit = git_commit()  # the code as copied, before anything can change in the working tree
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.resume:
            prepare_work_dir(work, args.modules, args.tests, args.max_children)
            (work / "commit.txt").write_text(commit + "\n", encoding="utf-8")
        args.out.mkdir(parents=True, exist_ok=True)
        selected = None
        if args.mutants_from is not None:
            selected = [line.strip() for line in args.mutants_from.read_text(encoding="utf-8").splitlines()
                        if line.strip()]
        seconds, finished = run_mutmut(work, args.max_children, args.time_limit, work / "mutmut.log",
                                       selected)
        sittings = record_sitting(work, started=started, seconds=seconds, finished=finished)
        statuses = mutant_statuses(work)
        if not statuses:
            print((work / "mutmut.log").read_text(encoding="utf-8")[-4000:], file=sys.stderr)
            raise SystemExit("mutmut produced no results (its log is above)")
        diffs = {name: mutant_diff(work, name) for name, status in statuses.items() if status == "survived"}
        write_report(args.out, command=command, commit=commit, statuses=statuses, diffs=diffs,
                     sittings=sittings, args=args)
        counts = Counter(statuses.values())
        print(f"{len(statuses)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
        print(f"report: {args.out / 'report.md'}")
    finally:
        if args.keep:
            print(f"scratch copy kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
