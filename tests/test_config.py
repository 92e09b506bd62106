"""Each class of bad config fails before anything runs, naming file, line, key path and expectation."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.config import load_pipeline
from pipeline.errors import ConfigError

from .conftest import ROOT, heedful_cmd

GOOD = """\
run_name: demo
model: tiny
stages:
  - name: sample
    uses: generate
    inputs: {prompts: data:quickstart/prompts.jsonl}
  - name: pairs
    uses: make_pairs
    inputs: {responses: sample.responses}
  - name: align
    uses: dpo
    inputs: {preferences: pairs.preferences}
    with:
      beta: 0.1
"""


def problems(tmp_path, text: str) -> list[str]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    return [str(p) for p in info.value.problems]


def test_good_config_resolves_in_dependency_order(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    pipeline = load_pipeline(path)
    assert [s.name for s in pipeline.stages] == ["sample", "pairs", "align"]
    assert pipeline.stage("align").deps == ["pairs"]
    assert pipeline.downstream("sample") == {"pairs", "align"}


def test_unknown_stage_type_names_line_and_suggests(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("uses: dpo", "uses: dpoo"))
    assert msg.startswith(f"{tmp_path}/pipeline.yaml:11: stages[2].uses: unknown stage type 'dpoo'")
    assert "did you mean 'dpo'" in msg


def test_missing_required_input(tmp_path):
    text = GOOD.replace("    inputs: {preferences: pairs.preferences}\n", "")
    (msg,) = problems(tmp_path, text)
    assert "stages[2].inputs: missing required input 'preferences'" in msg


def test_wrong_type_names_key_path_line_and_value(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("beta: 0.1", "beta: high"))
    assert msg.startswith(f"{tmp_path}/pipeline.yaml:14: stages[2].with.beta:")
    assert "valid number" in msg and "'high'" in msg


def test_unknown_key_lists_expected_keys(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("beta: 0.1", "betta: 0.1"))
    assert "stages[2].with.betta: unknown key: expected one of" in msg and "beta" in msg


def test_unknown_model_alias(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("model: tiny", "model: smollm3"))
    assert msg.startswith(f"{tmp_path}/pipeline.yaml:2: model: unknown model 'smollm3'")
    assert "smollm2-135m" in msg


def test_wired_to_missing_output(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("sample.responses", "sample.replies"))
    assert "stages[1].inputs.responses: stage 'sample' (generate) has no output 'replies': its outputs are responses" in msg


def test_wired_to_wrong_artifact_kind(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("pairs.preferences", "sample.responses"))
    assert "'sample.responses' is a responses artifact; input 'preferences' of dpo expects preferences" in msg


def test_wired_to_unknown_stage_or_file(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("pairs.preferences", "missing/prefs.jsonl"))
    assert "stages[2].inputs.preferences: file not found" in msg


def test_several_problems_reported_together(tmp_path):
    text = GOOD.replace("beta: 0.1", "beta: high").replace("model: tiny", "model: nope")
    assert len(problems(tmp_path, text)) == 2


def test_yaml_syntax_error_has_line(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("beta: 0.1", "beta: [0.1"))
    assert "invalid YAML" in msg and "pipeline.yaml:" in msg


def test_duplicate_stage_names(tmp_path):
    msgs = problems(tmp_path, GOOD.replace("name: pairs", "name: sample"))
    assert any("pipeline.yaml:7: stages[1].name: duplicate stage name 'sample'" in m for m in msgs), msgs


def test_cli_bad_config_exits_2_and_runs_nothing(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("beta: 0.1", "beta: high"))
    runs = tmp_path / "runs"
    proc = subprocess.run(heedful_cmd() + ["run", str(path), "--runs-dir", str(runs)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stages[2].with.beta" in proc.stdout and "nothing was run" in proc.stdout
    assert not runs.exists()


def test_set_override_reaches_stage_config(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    pipeline = load_pipeline(path, ["stages.align.with.beta=0.5", "model=tiny"])
    assert pipeline.stage("align").config.beta == 0.5


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("stages.align.with.beta=a: b: c", "--set: stages.align.with.beta=a: b: c: the value is not valid YAML"),
        ("model.x=1", "--set: model.x=1: 'model' is 'tiny', not a mapping"),
        ("stages.align.with.beta.x.y=1", "--set: stages.align.with.beta.x.y=1: 'stages.align.with.beta' is 0.1, not a mapping"),
    ],
)
def test_bad_set_is_a_config_error_naming_the_argument(tmp_path, assignment, expected):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, [assignment])
    assert str(info.value).startswith(expected), str(info.value)


def test_set_values_keep_their_yaml_types(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    pipeline = load_pipeline(path, ["seed=3", "stages.sample.with.num_samples=7"])
    assert pipeline.config.seed == 3 and pipeline.stage("sample").config.num_samples == 7


def test_relative_model_folder_resolves_against_the_config_folder(tmp_path, monkeypatch):
    """configs/x.yaml with `model: ../ckpt`, run from elsewhere: the stage gets the folder that was checked."""
    from pipeline.models import resolve_model

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt2").mkdir()
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "x.yaml"
    path.write_text(
        GOOD.replace("model: tiny", "model: ../ckpt").replace(
            "    uses: make_pairs\n", "    uses: make_pairs\n    model: ../ckpt2\n"
        )
    )
    monkeypatch.chdir(tmp_path)  # where ../ckpt is not the checkpoint
    pipeline = load_pipeline("configs/x.yaml")
    assert pipeline.stage("sample").model == str(tmp_path / "ckpt")
    assert resolve_model(pipeline.stage("sample").model) == str(tmp_path / "ckpt")
    assert pipeline.stage("pairs").model == str(tmp_path / "ckpt2")
    assert pipeline.config.model == "../ckpt"  # the config as written (the run record) is unchanged
    assert load_pipeline("configs/x.yaml", ["model=tiny"]).stage("sample").model == "tiny"


def test_relative_model_folders_in_stage_settings_resolve_against_the_config_folder(tmp_path, monkeypatch, tiny_model_path):
    """A simulator's `model: ./sim` in configs/x.yaml run from elsewhere loads configs/sim, as the
    pipeline's `model:` does, not a `sim` folder in the working directory; aliases, hub ids and an
    endpoint's served model name stay as written."""
    import shutil

    from pipeline.llm import build_client
    from pipeline.models import CONFIG_DIR
    from stages.ppo import PpoStageConfig
    from stages.simulate import SimulateConfig
    from stages.train_reward import TrainRewardConfig

    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copytree(tiny_model_path, configs / "sim")
    (tmp_path / "elsewhere" / "sim").mkdir(parents=True)  # what `./sim` would name from the working directory: no model
    path = configs / "x.yaml"
    path.write_text(
        """\
run_name: demo
model: tiny
stages:
  - name: users
    uses: simulate
    inputs: {conversations: data:quickstart/needs.jsonl}
    with:
      simulator: {model: ./sim, sampling: {max_new_tokens: 2, temperature: 0.0}}
  - name: hub_users
    uses: simulate
    inputs: {conversations: data:quickstart/needs.jsonl}
    with:
      simulator: {model: HuggingFaceTB/SmolLM2-135M-Instruct}
  - name: check
    uses: evaluate
    inputs: {prompts: data:quickstart/prompts.jsonl}
    with:
      judge: {kind: openai, model: ./sim, base_url: "http://127.0.0.1:9/v1"}
      users: {simulator: {model: tiny}}
"""
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    pipeline = load_pipeline("../configs/x.yaml")
    simulator = pipeline.stage("users").config.simulator
    assert simulator.model == str(configs / "sim")
    # the executor re-reads the config as dumped: the folder stays the one beside the config
    assert (
        SimulateConfig.model_validate(pipeline.stage("users").config.model_dump(mode="json")).simulator.model == simulator.model
    )
    assert build_client(simulator).complete([[{"role": "user", "content": "Hi"}]])  # loads configs/sim
    assert pipeline.stage("hub_users").config.simulator.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    evaluate = pipeline.stage("check").config
    assert evaluate.judge.model == "./sim"  # an endpoint's served model name, not a folder
    assert evaluate.users.simulator.model == "tiny"
    # the other models a stage's `with:` names: a PPO critic, a reward model's base
    context = {CONFIG_DIR: configs}
    assert PpoStageConfig.model_validate({"value_model": "./sim"}, context=context).value_model == str(configs / "sim")
    assert PpoStageConfig.model_validate({"value_model": "head"}, context=context).value_model == "head"
    reward = {"kind": "plove", "base_model": "sim"}
    assert TrainRewardConfig.model_validate(reward, context=context).base_model == str(configs / "sim")
    assert TrainRewardConfig.model_validate({**reward, "base_model": "minilm"}, context=context).base_model == "minilm"


def test_relative_paths_in_stage_settings_resolve_against_the_config_folder(tmp_path, monkeypatch):
    """Every file or folder a stage's `with:` names is read beside the config, as its inputs and
    models are, whatever the working directory: an endpoint's key file (a decoy of the same name
    in the working directory is not read), a pull's token and cursor, a DeepSpeed config, a drift
    set, follow-up lists. `~` is expanded; absolute paths, `data:` references and URLs stay."""
    from pipeline.llm import api_key

    configs = tmp_path / "configs"
    configs.mkdir()
    here = tmp_path / "elsewhere"
    here.mkdir()
    for folder, key in ((configs, "sk-beside-the-config"), (here, "sk-decoy")):
        (folder / "key").write_text(key)
        (folder / "key").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = configs / "x.yaml"
    path.write_text(
        f"""\
run_name: demo
model: tiny
stages:
  - name: check
    uses: evaluate
    inputs: {{prompts: data:quickstart/prompts.jsonl}}
    with:
      judge: {{kind: openai, model: served, base_url: "http://127.0.0.1:9/v1", api_key_file: key}}
      users: {{simulator: {{kind: openai, model: served, api_key_file: ~/key}}}}
      general_set: drift/general.jsonl
  - name: check_default
    uses: evaluate
    inputs: {{prompts: data:quickstart/prompts.jsonl}}
  - name: pull
    uses: serve_pull
    with: {{url: "http://127.0.0.1:9", token_file: ../secrets/token, cursor_file: {tmp_path}/cursor.json}}
  - name: human
    uses: argilla_pull
    with: {{dataset: d, argilla: {{api_key_file: argilla_key}}, cursor_file: cursors/human.json}}
  - name: ship
    uses: deploy
    inputs: {{package: data:quickstart/prompts.jsonl, decision: data:quickstart/prompts.jsonl}}
    with: {{url: "http://127.0.0.1:9", token_file: token}}
  - name: rm
    uses: train_reward
    inputs: {{feedback: data:quickstart/prompts.jsonl}}
    with:
      kind: followup
      followup: {{followups: lists.json}}
      distributed: {{deepspeed: ds.json, storage_path: "s3://bucket/ckpt"}}
      trainer_args:
        deepspeed: ../shared/ds.json
        fsdp_config: '{{"version": 2}}'
        accelerator_config: {tmp_path}/accelerate.json
        output_dir: somewhere
  - name: align
    uses: dpo
    inputs: {{preferences: data:quickstart/prompts.jsonl}}
    with: {{trainer_args: {{fsdp_config: fsdp.json, deepspeed: {{zero_optimization: {{stage: 2}}}}}}}}
"""
    )
    monkeypatch.chdir(here)
    pipeline = load_pipeline("../configs/x.yaml")
    check = pipeline.stage("check").config
    assert check.judge.api_key_file == str(configs / "key")
    assert api_key(check.judge) == "sk-beside-the-config"
    assert check.users.simulator.api_key_file == str(tmp_path / "home" / "key")
    assert check.general_set == str(configs / "drift" / "general.jsonl")
    assert pipeline.stage("check_default").config.general_set.startswith("data:")  # a shipped file
    pull = pipeline.stage("pull").config
    assert pull.token_file == str(tmp_path / "secrets" / "token") and pull.cursor_file == str(tmp_path / "cursor.json")
    human = pipeline.stage("human").config
    assert human.argilla.api_key_file == str(configs / "argilla_key")
    assert human.cursor_file == str(configs / "cursors" / "human.json")  # written there too: beside the config
    assert pipeline.stage("ship").config.token_file == str(configs / "token")
    rm = pipeline.stage("rm").config
    assert rm.followup.followups == str(configs / "lists.json")
    assert rm.distributed.deepspeed == str(configs / "ds.json") and rm.distributed.storage_path == "s3://bucket/ckpt"
    # trainer_args' keys that transformers reads as a JSON file's path (pipeline.training.TRAINER_PATH_ARGS) too;
    # an inline JSON string, a dict, an absolute path and any other key go to transformers as written
    assert rm.trainer_args == {
        "deepspeed": str(tmp_path / "shared" / "ds.json"),
        "fsdp_config": '{"version": 2}',
        "accelerator_config": f"{tmp_path}/accelerate.json",
        "output_dir": "somewhere",
    }
    align = pipeline.stage("align").config.trainer_args
    assert align == {"fsdp_config": str(configs / "fsdp.json"), "deepspeed": {"zero_optimization": {"stage": 2}}}
    # the executor re-reads the config as dumped: the paths stay the ones beside the config
    assert type(check).model_validate(check.model_dump(mode="json")).judge.api_key_file == str(configs / "key")


def test_every_path_field_of_a_stage_config_is_read_beside_the_config():
    """A file or folder field added to a stage's settings (named *_file, *_path, path, adapter) is
    a `ConfigPath`, so it is read beside the config like the others, not from the working directory."""
    import re
    import typing

    from pydantic import BaseModel

    from pipeline import registry
    from pipeline.models import ConfigAdapter, config_adapter
    from pipeline.paths import ConfigPath, _relative_to_config

    def config_path(field) -> bool:
        if any(getattr(m, "func", None) in (_relative_to_config, config_adapter) for m in field.metadata):
            return True
        return any(t in typing.get_args(field.annotation) for t in (ConfigPath, ConfigAdapter))

    def models(annotation) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models(arg)]

    found, missing, seen = [], [], set()
    todo = [registry.get(name).Config for name in registry.names()]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, field in cls.model_fields.items():
            todo += models(field.annotation)
            if re.search(r"(^|_)(path|file|adapter)$", name) and "str" in str(field.annotation):
                (found if config_path(field) else missing).append(f"{cls.__name__}.{name}")
    assert not missing, missing
    assert {"LLMSettings.adapter", "LLMSettings.api_key_file", "SimulateConfig.cache_path"} <= set(found)


def test_a_mistyped_model_folder_in_with_fails_when_the_config_is_read(tmp_path, tiny_model_path):
    """`simulator: {model: ./nosuch}` (kind hf) is a config error naming the file, the line, the
    stage and the field when the config is read, as a mistyped pipeline `model:` is, before any
    stage runs (not when the simulate stage starts, after the ones before it); so are a PPO
    critic's and a reward model's base. An endpoint's model is a served name: not looked for."""
    configs = tmp_path / "configs"
    configs.mkdir()
    path = configs / "x.yaml"
    path.write_text(
        """\
run_name: demo
model: tiny
stages:
  - name: sample
    uses: generate
    inputs: {prompts: data:quickstart/prompts.jsonl}
  - name: users
    uses: simulate
    inputs: {conversations: data:quickstart/needs.jsonl}
    with:
      simulator: {model: ./nosuch}
  - name: served_users
    uses: simulate
    inputs: {conversations: data:quickstart/needs.jsonl}
    with:
      simulator: {kind: openai, model: ./served-name, base_url: "http://127.0.0.1:9/v1"}
  - name: rm
    uses: train_reward
    inputs: {feedback: data:quickstart/prompts.jsonl}
    with: {kind: plove, base_model: ../nosuch_base}
"""
    )
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    found = [str(p) for p in info.value.problems]
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}:11: stages[1].with.simulator.model: Value error, unknown model './nosuch'"), found
    assert f"no folder {configs / 'nosuch'}" in found[0]
    assert found[1].startswith(f"{path}:20: stages[3].with.base_model: Value error, unknown model '../nosuch_base'"), found
    runs = tmp_path / "runs"
    proc = subprocess.run(heedful_cmd() + ["run", str(path), "--runs-dir", str(runs)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stages[1].with.simulator.model" in proc.stdout and "nothing was run" in proc.stdout
    assert not runs.exists()


def test_a_mistyped_adapter_folder_in_with_fails_when_the_config_is_read(tmp_path):
    """An LLM's `adapter:` in a stage's `with:` that names a local folder which is not there (relative:
    looked for beside the config; absolute) is a config error naming the file, the line, the stage
    and the field when the config is read, as a mistyped model folder is, not when the stage loads it
    minutes in; so is a file. An existing folder is read beside the config, a hub id (`org/name`, no
    such folder beside the config) stays as written, and an adapter wired from another stage's output
    (`inputs:`) is not looked for."""
    (tmp_path / "adapters" / "a1").mkdir(parents=True)
    (tmp_path / "adapter.txt").write_text("not a folder")
    wired = """\
  - name: good
    uses: simulate
    inputs: {conversations: data:quickstart/needs.jsonl, adapter: align.adapter}
    with:
      simulator: {model: tiny, adapter: adapters/a1}
  - name: hub
    uses: evaluate
    inputs: {prompts: data:quickstart/prompts.jsonl, adapter: align.adapter}
    with:
      judge: {model: tiny, adapter: some-org/some-adapter}
"""
    mistyped = f"""\
  - name: users
    uses: simulate
    inputs: {{conversations: data:quickstart/needs.jsonl}}
    with:
      simulator: {{model: tiny, adapter: ./adaptrs/a1}}
  - name: check
    uses: evaluate
    inputs: {{prompts: data:quickstart/prompts.jsonl}}
    with:
      judge: {{model: tiny, adapter: {tmp_path}/nowhere}}
      users: {{simulator: {{model: tiny, adapter: adapter.txt}}}}
  - name: typo
    uses: simulate
    inputs: {{conversations: data:quickstart/needs.jsonl}}
    with:
      simulator: {{model: tiny, adapter: adapters/a2}}
"""
    path = tmp_path / "pipeline.yaml"
    found = sorted(problems(tmp_path, GOOD + wired + mistyped), key=lambda p: int(p[len(str(path)) + 1 :].split(":")[0]))
    assert len(found) == 4, found
    assert found[0].startswith(f"{path}:29: stages[5].with.simulator.adapter: Value error, adapter folder not found"), found
    assert f"(no folder {tmp_path / 'adaptrs' / 'a1'}: a relative one is read beside the config file)" in found[0]
    assert found[1].startswith(f"{path}:34: stages[6].with.judge.adapter: Value error, adapter folder not found"), found
    assert found[1].endswith(f"(got '{tmp_path}/nowhere')"), found
    assert found[2].startswith(f"{path}:35: stages[6].with.users.simulator.adapter: Value error, adapter path 'adapter.txt'")
    assert "expected an adapter folder" in found[2]
    # shaped like a hub id, but `adapters/` is a folder beside the config: a mistyped local adapter
    assert found[3].startswith(f"{path}:40: stages[7].with.simulator.adapter: Value error, adapter folder not found"), found
    path.write_text(GOOD + wired)
    pipeline = load_pipeline(path)
    assert pipeline.stage("good").config.simulator.adapter == str(tmp_path / "adapters" / "a1")
    assert pipeline.stage("hub").config.judge.adapter == "some-org/some-adapter"
