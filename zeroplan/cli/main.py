"""Glue: builds the typer app from the verb modules and turns errors into one line each.

Every error a user can cause ends as one line on stderr and exit status 2 (3 when no plan fits);
no traceback reaches the terminal.
"""

from __future__ import annotations

import sys

from zeroplan.core.errors import ZeroplanError

VERBS = ("estimate", "recommend", "generate", "validate", "probe", "bench", "report", "calibrate", "rehearse")


def build_app(only: str | None = None):
    """The typer app with the verb modules' commands registered under their names (only `only`'s
    when the command line names a verb: importing every verb costs start-up time)."""
    import typer

    # Plain (click) help: rich markup would eat "[calibrated]" and show every flag as taking a <bool>.
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                      help="Per-GPU memory plans and DeepSpeed ZeRO configs for InternVL training.")
    import importlib

    # A callback keeps the app a group of sub-commands even when only one verb is registered.
    app.callback()(_root_callback(typer))
    for verb in ((only,) if only in VERBS else VERBS):
        try:
            module = importlib.import_module(f"zeroplan.cli.{verb}")
        except ModuleNotFoundError as error:
            if error.name != f"zeroplan.cli.{verb}":
                raise
            continue
        app.command(verb, help=module.__doc__.strip().splitlines()[0])(module.command)
    return app


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"zeroplan {version('zeroplan')}")
        except PackageNotFoundError:  # a source tree that was never installed
            print("zeroplan (source tree, not installed)")
        import typer

        raise typer.Exit(0)


def _root_callback(typer):
    """The app's callback, with --version; typer is passed in because it is imported late (the
    DeepSpeed validator starts first: see main)."""

    def _root(
        show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print zeroplan's version and exit."),
    ) -> None:
        """Per-GPU memory plans and DeepSpeed ZeRO configs for InternVL training."""

    return _root


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


# The verbs that predict memory (and so replay the allocator).
_PREDICTING_VERBS = frozenset({"recommend", "estimate", "validate", "generate", "calibrate", "report", "rehearse"})


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status instead of raising."""
    args = argv if argv is not None else sys.argv[1:]
    verb = args[0] if args else None
    if verb == "recommend" and not any(a in ("--help", "-h") for a in args):
        from zeroplan.adapters.validator_process import prestart

        prestart(args)  # before typer and rich are imported: DeepSpeed's import is the long pole
    store = None
    if verb in _PREDICTING_VERBS:  # replays of earlier runs (zeroplan.adapters.cache)
        from zeroplan.adapters.cache import ReplayStore
        from zeroplan.core.memory import use_replay_store

        store = ReplayStore.open()
        use_replay_store(store)
    try:
        return _run(args, verb)
    finally:
        from zeroplan.adapters.validator_process import discard_prestarted

        discard_prestarted()
        if store is not None:
            use_replay_store(None)
            store.flush()


def _run(args: list[str], verb: str | None) -> int:
    import typer

    try:  # typer >= 0.20 ships its own copy of click; its exceptions are the ones raised
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import exceptions as click_exceptions

    command = typer.main.get_command(build_app(verb))
    try:
        result = command.main(args=args, prog_name="zeroplan",
                              standalone_mode=False)
        return result if isinstance(result, int) else 0
    except ZeroplanError as error:
        print(f"zeroplan: {error.label}: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    except click_exceptions.NoArgsIsHelpError:
        return 0  # typer has printed the help already
    except click_exceptions.UsageError as error:
        print(f"zeroplan: error: {_one_line(error.format_message())}", file=sys.stderr)
        return 2
    except typer.Exit as error:  # typer >= 0.20 keeps Exit and Abort in typer.exceptions, not its click copy
        return error.exit_code
    except typer.Abort:
        print("zeroplan: aborted", file=sys.stderr)
        return 130
    except click_exceptions.ClickException as error:
        print(f"zeroplan: error: {_one_line(error.format_message())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as error:  # a path the file system refuses (name too long, ...) that no verb caught
        path = _one_line(error.filename)[:200] if error.filename else "a path"
        print(f"zeroplan: error: cannot use {path}: {_one_line(error.strerror or error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zeroplan: interrupted", file=sys.stderr)
        return 130


def app() -> None:
    """Console-script entry point. When a command loaded torch (estimate's DeepSpeed column,
    validate), the interpreter's teardown of it takes a few hundred milliseconds for nothing:
    every file is already written and closed, so flush the streams and leave at once."""
    code = main()
    if "torch" in sys.modules:
        import os

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)
