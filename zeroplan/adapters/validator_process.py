"""DeepSpeed's config validation in a child process started before planning.

Importing DeepSpeed (and torch under it) takes two to three seconds on a small machine; the
planner takes about one. Starting the import in a second process when a command begins lets both
run at once, so `zeroplan recommend` validates every config through DeepSpeed; a config accepted
before by the same libraries is answered from zeroplan.adapters.cache and the child is
stopped unused.
"""

from __future__ import annotations

import json
import subprocess
import sys

from zeroplan.adapters import cache
from zeroplan.core.errors import InvalidConfig


_PRESTARTED: list["BackgroundValidator"] = []
# The command line prestart saw, hashed: the validation cache links it to the request it led to,
# so that the same command next time starts no DeepSpeed import it will not need.
_COMMAND_HINT: list[str] = []


def prestart(argv: list[str] | None = None) -> None:
    """Start a validator before anything else is imported (the CLI calls this for `recommend`),
    so DeepSpeed's import overlaps the CLI's own start-up as well as the planning; unless this
    command line led last time to a config the validation cache holds (then the child would most
    likely be stopped unused, after taking a core from the planner; if the plan has changed since,
    the child starts when asked)."""
    if _PRESTARTED:
        return
    _COMMAND_HINT[:] = [cache.command_hint(list(argv or ()))]
    if cache.expects_answer(_COMMAND_HINT[0]):
        return
    _PRESTARTED.append(BackgroundValidator().start())


def discard_prestarted() -> None:
    """Stop a prestarted validator the command did not use (it failed before validating)."""
    while _PRESTARTED:
        _PRESTARTED.pop().close()
    _COMMAND_HINT.clear()


def take() -> "BackgroundValidator":
    """The prestarted validator, or a new one (its child starts when a config needs DeepSpeed)."""
    return _PRESTARTED.pop() if _PRESTARTED else BackgroundValidator()


class BackgroundValidator:
    """A child process that imports DeepSpeed (from `start`, or when a config needs it) and
    validates one config when asked; a config accepted before is answered from the cache."""

    def __init__(self):
        self._process: subprocess.Popen | None = None

    def start(self) -> "BackgroundValidator":
        """Start the child's DeepSpeed import now."""
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "zeroplan.adapters.validator_process"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def validate(self, config: dict, world_size: int | None, timeout_s: float = 120,
                 trainer: dict | None = None) -> tuple[list[str], str]:
        """(auto field names, note). Raises InvalidConfig when DeepSpeed rejects the config; the note
        says when DeepSpeed could not be asked (not installed), so the caller can say so.

        With `trainer` ({"argv": [...], "script_flags": [...]}) the child also runs the HF
        Trainer's own check on the config and those arguments at `world_size`
        (zeroplan.adapters.hf_trainer.check); a mismatch raises InvalidConfig, one line each."""
        request = {"config": config, "world_size": world_size, "trainer": trainer}
        remembered = cache.recall(request)
        if remembered is not None:  # accepted before, by the same libraries and code
            self.close()
            cache.link(_COMMAND_HINT, request)
            return remembered["auto"], remembered["note"]
        try:
            out, _ = self.start()._process.communicate(json.dumps(request), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            return [], "DeepSpeed validation timed out; the config was not validated"
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return [], "DeepSpeed validation process failed; the config was not validated"
        if answer.get("error"):
            raise InvalidConfig(answer["error"])
        if cache.remember(request, answer):
            cache.link(_COMMAND_HINT, request)
        return answer.get("auto", []), answer.get("note", "")

    def close(self) -> None:
        """Stop the child if it still runs."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def _trainer_check(request: dict) -> str:
    """The HF Trainer's check of the config against the trainer's arguments, or what stopped it."""
    from zeroplan.adapters import hf_trainer
    from zeroplan.core.errors import InvalidInput, MissingDependency

    trainer = request["trainer"]
    try:
        result = hf_trainer.check(request["config"], trainer["argv"], request["world_size"] or 1,
                                  frozenset(trainer.get("script_flags", ())))
    except MissingDependency as error:
        return f"validated by DeepSpeed's config classes; trainer arguments not checked: {error}"
    except InvalidInput as error:
        raise InvalidConfig(str(error)) from None
    if result.mismatches:
        raise InvalidConfig("the HF Trainer would refuse the config: " + "; ".join(result.mismatches))
    return ("validated by DeepSpeed's config classes and, with the launch lines' arguments, by transformers' "
            "HfTrainerDeepSpeedConfig (no mismatch, no \"auto\" left)" if not result.auto_left else
            f"HF Trainer leaves {', '.join(result.auto_left)} as \"auto\"")


def _serve() -> None:
    import logging
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.disable(logging.WARNING)
    from zeroplan.core.errors import MissingDependency

    try:
        from zeroplan.adapters import deepspeed_adapter
        deepspeed_adapter._deepspeed_config_class()
        ready = None
    except MissingDependency as error:
        ready = str(error)
    request = json.loads(sys.stdin.read())
    if ready is not None:
        answer = {"auto": [], "note": f"not validated: {ready}"}
    else:
        try:
            auto = deepspeed_adapter.validate_config(request["config"], request["world_size"])
            answer = {"auto": auto, "note": ""}
            if request.get("trainer"):
                answer["note"] = _trainer_check(request)
        except InvalidConfig as error:
            answer = {"error": str(error)}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    sys.stdout.flush()
    # Skip the interpreter's teardown of torch and DeepSpeed (a few hundred milliseconds the
    # parent would otherwise wait for before it sees the end of the answer).
    os._exit(0)


if __name__ == "__main__":
    _serve()
