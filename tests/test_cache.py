"""recommend's DeepSpeed validation is remembered per request, libraries' versions and zeroplan's
validating code: asked again, the answer comes without a child process; a rejection, another
DeepSpeed, or a cache turned off asks DeepSpeed again."""

import json

import pytest

from zeroplan.adapters import cache as zcache, validator_process
from zeroplan.core import memory
from zeroplan.core.errors import InvalidConfig

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 64,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ZEROPLAN_CACHE", raising=False)
    return tmp_path / "validated"


@pytest.fixture
def no_child(monkeypatch):
    """A validator whose DeepSpeed child must not start."""
    def refuse(self):
        raise AssertionError("DeepSpeed's child process was started")

    monkeypatch.setattr(validator_process.BackgroundValidator, "start", refuse)


def _fresh_answer(config=CONFIG, world_size=8):
    validator = validator_process.BackgroundValidator()
    try:
        return validator.validate(config, world_size)
    finally:
        validator.close()


def test_an_accepted_config_is_answered_again_without_deepspeed(cache, monkeypatch):
    first = _fresh_answer()  # a real child: DeepSpeed's own config classes
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(validator_process.BackgroundValidator, "start",
                        lambda self: (_ for _ in ()).throw(AssertionError("child started")))
    assert _fresh_answer() == first


def test_the_answer_is_keyed_by_request_versions_and_code(cache, monkeypatch):
    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    key = zcache.request_key(request)
    assert zcache.request_key({**request, "world_size": 16}) != key
    assert zcache.request_key({**request, "config": {**CONFIG, "train_batch_size": 128}}) != key
    assert zcache.request_key({**request, "trainer": {"argv": ["--bf16", "True"]}}) != key
    versions = dict(zcache._versions())
    monkeypatch.setattr(zcache, "_versions", lambda: {**versions, "deepspeed": "0.0.1"})
    assert zcache.request_key(request) != key
    monkeypatch.setattr(zcache, "_versions", lambda: versions)
    monkeypatch.setattr(zcache, "_sources_digest", lambda: "edited")
    assert zcache.request_key(request) != key


def test_a_rejection_is_not_remembered(cache):
    bad = {**CONFIG, "train_batch_size": 65}
    with pytest.raises(InvalidConfig):
        _fresh_answer(bad)
    assert not list(cache.glob("*.json"))


def test_remember_and_recall_round_trip_and_skip_errors(cache):
    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    assert zcache.recall(request) is None
    assert not zcache.remember(request, {"error": "DeepSpeed rejects the config: x"})
    assert not zcache.remember(request, {"auto": [], "note": "not validated: deepspeed missing"})
    assert zcache.recall(request) is None
    assert zcache.remember(request, {"auto": ["a.b"], "note": "n"})
    assert zcache.recall(request) == {"auto": ["a.b"], "note": "n"}


def test_a_damaged_entry_is_a_miss(cache):
    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    zcache.remember(request, {"auto": [], "note": ""})
    entry = next(cache.glob("*.json"))
    for damage in ("{not json", json.dumps({"auto": "x", "note": 1}), json.dumps([1, 2])):
        entry.write_text(damage)
        assert zcache.recall(request) is None


def test_turned_off_nothing_is_read_or_written(cache, monkeypatch):
    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    zcache.remember(request, {"auto": [], "note": ""})
    monkeypatch.setenv("ZEROPLAN_CACHE", "off")
    assert zcache.recall(request) is None
    assert not zcache.remember({**request, "world_size": 4}, {"auto": [], "note": ""})
    assert len(list(cache.glob("*.json"))) == 1


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ZEROPLAN_CACHE_DIR", str(blocker))  # a file where the folder would be
    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    assert not zcache.remember(request, {"auto": [], "note": ""})
    assert zcache.recall(request) is None


def test_a_command_answered_before_starts_no_child_early(cache, monkeypatch, no_child):
    argv = ["recommend", "--model", "8b", "--gpus", "8"]
    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    hint = zcache.command_hint(argv)
    assert not zcache.expects_answer(hint)
    zcache.remember(request, {"auto": [], "note": ""})
    zcache.link([hint], request)
    assert zcache.expects_answer(hint)
    validator_process.prestart(argv)  # would start the child (no_child) if it expected to need it
    try:
        assert not validator_process._PRESTARTED
        validator = validator_process.take()
        assert validator.validate(CONFIG, 8) == ([], "")
    finally:
        validator_process.discard_prestarted()


def test_recommend_twice_gives_the_same_bytes(cache, tmp_path, capsys, monkeypatch):
    from zeroplan.cli.main import main

    argv = ["recommend", "--model", "1b", "--gpus", "8", "--json", "--out", str(tmp_path / "ds.json"), "--force"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(validator_process.BackgroundValidator, "start",
                        lambda self: (_ for _ in ()).throw(AssertionError("child started")))
    memory._replayed.cache_clear()  # what this process remembers: the second run must use the store
    monkeypatch.setattr(memory, "replay", lambda *a, **k: (_ for _ in ()).throw(AssertionError("replayed")))
    assert main(argv) == 0
    assert capsys.readouterr().out == first


# ---------------------------------------------------------------- replays

SHAPES = [dict(model="2b", stage=1, micro=2, ckpt=False), dict(model="8b", stage=3, micro=1, ckpt=True),
          dict(model="26b", stage=2, micro=4, ckpt=True)]


def _estimates():
    from zeroplan.core.plan import Plan, TrainShape
    from zeroplan.core.profiles import load_gpu, load_model

    gpu = load_gpu("h100")
    return [memory.estimate(load_model(c["model"]), TrainShape(micro_batch=c["micro"], grad_ckpt=c["ckpt"]),
                            Plan(stage=c["stage"], gpus_per_node=8), gpu) for c in SHAPES]


def test_a_kept_replay_equals_a_fresh_one(cache, monkeypatch):
    memory._replayed.cache_clear()
    fresh = _estimates()  # no store: computed
    store = zcache.ReplayStore.open()
    memory.use_replay_store(store)
    try:
        memory._replayed.cache_clear()
        assert _estimates() == fresh
        store.flush()
        memory.use_replay_store(zcache.ReplayStore.open())  # another run, reading the file
        memory._replayed.cache_clear()
        monkeypatch.setattr(memory, "replay", lambda *a, **k: (_ for _ in ()).throw(AssertionError("replayed")))
        assert _estimates() == fresh
    finally:
        memory.use_replay_store(None)
        memory._replayed.cache_clear()


def test_replays_of_another_core_are_not_used_and_are_removed(cache, monkeypatch):
    store = zcache.ReplayStore.open()
    store.put("inputs", (3, 2, 1))
    store.flush()
    assert zcache.ReplayStore.open().get("inputs") == (3, 2, 1)
    monkeypatch.setattr(zcache, "_core_digest", lambda: "edited")
    edited = zcache.ReplayStore.open()
    assert edited.get("inputs") is None
    edited.put("other", (1, 1, 1))
    edited.flush()
    assert [p.name for p in (cache.parent / "replays").iterdir()] == ["replays-edited.json"]


def test_the_store_keeps_the_newest_and_survives_damage(cache, monkeypatch):
    monkeypatch.setattr(zcache, "MAX_REPLAYS", 3)
    first = zcache.ReplayStore.open()
    for n in range(5):
        first.put(f"inputs {n}", (n, n, n))
    first.flush()
    again = zcache.ReplayStore.open()
    assert [again.get(f"inputs {n}") for n in range(5)] == [None, None, (2, 2, 2), (3, 3, 3), (4, 4, 4)]
    again.path.write_text("{damaged")
    assert zcache.ReplayStore.open().get("inputs 4") is None
    monkeypatch.setenv("ZEROPLAN_CACHE", "off")
    assert zcache.ReplayStore.open() is None


# ---------------------------------------------------------------- DeepSpeed's estimators


def test_deepspeeds_estimates_are_kept_and_equal_a_fresh_call(cache, monkeypatch):
    from zeroplan.adapters import deepspeed_adapter
    from zeroplan.core.plan import Plan, TrainShape
    from zeroplan.core.profiles import load_model

    profile, shape = load_model("26b"), TrainShape()
    plan = Plan(stage=3, gpus_per_node=8, nodes=2, offload_optimizer="cpu")
    fresh = deepspeed_adapter.estimator_bytes(profile, shape, plan)
    monkeypatch.setattr(deepspeed_adapter, "_deepspeed_estimates",
                        lambda **kw: (_ for _ in ()).throw(AssertionError("DeepSpeed called")))
    assert deepspeed_adapter.estimator_bytes(profile, shape, plan) == fresh
    # another stage reads the same two formulas; another cluster is another request
    assert deepspeed_adapter.estimator_bytes(profile, shape, plan.with_(stage=1))["zero2"] == fresh["zero2"]
    with pytest.raises(AssertionError, match="DeepSpeed called"):
        deepspeed_adapter.estimator_bytes(profile, shape, plan.with_(nodes=4))


def test_a_package_found_elsewhere_is_another_key(cache, monkeypatch):
    from importlib import util

    request = {"config": CONFIG, "world_size": 8, "trainer": None}
    key = zcache.request_key(request)
    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    zcache._versions.cache_clear()
    try:
        assert zcache.request_key(request) != key
    finally:
        monkeypatch.undo()
        zcache._versions.cache_clear()
