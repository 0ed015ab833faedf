"""Pure core: config validation, --set overrides, fingerprints, and the registries."""

import pytest

from dafactory.tasks.config import PreferenceConfig, RayConfig, StageResources, build_config
from dafactory.tasks.errors import UserError
from dafactory.tasks.registry import Registry
from dafactory.tasks.run.preflight import check_names


@pytest.mark.parametrize(
    "overrides, message",
    [
        # N below 1
        (["n=0"], "invalid config: n: Input should be greater than or equal to 1"),
        # negative temperature
        (["sampling.temperature=-0.1"], "invalid config: sampling.temperature: Input should be greater than or equal to 0"),
        # a typo in a field name is an error, not silently ignored
        (["sampling.temprature=0.5"], "invalid config: sampling.temprature: Extra inputs are not permitted"),
        # unknown scorer, with a suggestion
        (['scorers=[{"name": "refusal_heuristik"}]'], "unknown scorer 'refusal_heuristik': did you mean 'refusal_heuristic'?"),
        # unknown backend, with a suggestion
        (["student.backend=hff"], "unknown backend 'hff': did you mean 'hf'?"),
        # unknown generation engine of the transformers backend, with a suggestion
        (['student.params={"engine": "pagd"}'], "unknown engine 'pagd': did you mean 'paged'?"),
        # selection names a scorer that is not configured
        (["selection.scorer=reward_model"], "selection uses scorer 'reward_model', which is not among the configured scorers"),
        # an unknown strategy, listing the known ones
        (["selection.strategy=best_guess"], "unknown selection.strategy 'best_guess'; known: signal, first_sample"),
        # the paper's rule needs its scorer configured
        (["selection.strategy=latent_argmin_cos"], "selection uses scorer 'latent_attribution', which is not among"),
        # safe/unsafe pairs need a judge among the scorers
        (["selection.pairs=safe_unsafe"], "selection.judge must name a configured scorer"),
        # a detail signal has no declared direction
        (['scorers=[{"name": "refusal_heuristic"}]', "selection.scorer=refusal_heuristic:x"], "set selection.direction"),
        # a strategy without a signal cannot make best/worst pairs
        (["selection.strategy=random"], "ranks by no signal: use pairs: safe_unsafe"),
        # malformed --set
        (["n"], "--set expects key=value"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, message):
    # values are validated when the config is built; names against the registries in preflight
    with pytest.raises(UserError) as err:
        check_names(build_config(PreferenceConfig, None, overrides))
    assert str(err.value).startswith(message) or message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("n: 8\nsampling:\n  temperature: 0.6\nstudent:\n  model: org/name\n")
    cfg = build_config(PreferenceConfig, path, ["sampling.max_new_tokens=32", "student.num_gpus=1"])
    assert (cfg.n, cfg.sampling.temperature, cfg.sampling.max_new_tokens) == (8, 0.6, 32)
    assert (cfg.student.model, cfg.student.num_gpus, cfg.student.trust_remote_code) == ("org/name", 1, False)
    with pytest.raises(UserError, match="config file not found"):
        build_config(PreferenceConfig, tmp_path / "nope.yaml")


def test_fingerprint_ignores_where_and_how_fast():
    base = build_config(PreferenceConfig)
    same = build_config(
        PreferenceConfig, None,
        ["output=s3://b/x", "ray.address=auto", "student.num_replicas=4", "student.num_gpus=1", "scoring.num_replicas=2"],
    )
    assert same.fingerprint() == base.fingerprint()
    for change in ["n=5", "sampling.seed=1", "student.model=other", "shard_size=7", "selection.min_margin=0.1"]:
        assert build_config(PreferenceConfig, None, [change]).fingerprint() != base.fingerprint(), change


def test_generation_key_ignores_the_input_location_and_scorers():
    base = build_config(PreferenceConfig)
    moved = build_config(PreferenceConfig, None, ["prompts.path=/elsewhere/p.jsonl", "selection.min_margin=0.5"])
    assert moved.generation_key() == base.generation_key() and moved.fingerprint() != base.fingerprint()
    for change in ["n=5", "sampling.seed=1", "student.batch_size=3", "system_prompt=hi"]:
        assert build_config(PreferenceConfig, None, [change]).generation_key() != base.generation_key(), change


def test_registry_refuses_duplicates_and_suggests():
    reg = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(2)
    assert reg.get("alpha") == 1
    with pytest.raises(UserError, match="did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(UserError, match="unknown thing 'zzz': known: alpha"):
        reg.get("zzz")


@pytest.mark.parametrize(
    "others, replicas, ray_cfg, env, cpus",
    [
        # a local Ray on 2 cores, the scorer asking half of one: the generator gets the rest (2 torch threads)
        ([StageResources(num_cpus=0.5)], 1, RayConfig(num_cpus=2), {}, 1.5),
        # two replicas share what is left
        ([StageResources(num_cpus=1)], 2, RayConfig(num_cpus=9), {}, 4.0),
        # never below one each
        ([StageResources(num_replicas=4, num_cpus=1)], 2, RayConfig(num_cpus=2), {}, 1.0),
        # on a cluster (an address, or RAY_ADDRESS), one CPU: the nodes are sized by whoever runs them
        ([StageResources(num_cpus=0.5)], 1, RayConfig(address="ray://head:10001"), {}, 1.0),
        ([StageResources(num_cpus=0.5)], 1, RayConfig(num_cpus=8), {"RAY_ADDRESS": "head:6379"}, 1.0),
    ],
)
def test_a_model_stage_left_at_its_default_uses_the_cores_the_others_leave(others, replicas, ray_cfg, env, cpus,
                                                                           monkeypatch):
    from dafactory.tasks.config import ModelConfig
    from dafactory.tasks.run.stages import auto_cpus, generate_spec

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert auto_cpus(others, replicas, ray_cfg) == cpus
    spec = generate_spec(ModelConfig(backend="fake", num_replicas=replicas), (), others, ray_cfg)
    assert spec.num_cpus == spec.args[0].num_cpus == cpus  # the actor's request and its torch threads agree
    # a number in the config is kept as it is
    assert generate_spec(ModelConfig(backend="fake", num_cpus=0.5), (), others, ray_cfg).num_cpus == 0.5
