"""Bad inputs a user can hand align: each is refused with exit 2, one bounded `error:` message naming the culprit,
no traceback and nothing published, before any weights load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"
TINY_DPO = REPO / "recipes" / "tiny" / "dpo.yaml"

CARD = "name: c\ndescription: d\nlicense: MIT\nsource:\n  path: rows.jsonl\nformat: messages\n"


def alias_bomb(levels: int = 9) -> str:
    """YAML of a few lines that expands to 10^levels values through aliases ("billion laughs")."""
    lines = ["bomb0: &b0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def refused(result: object, *fragments: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 2, stderr[-2000:]  # type: ignore[attr-defined]
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    assert len(stderr) < 2000, "an error message must stay short whatever the input"
    for fragment in fragments:
        assert fragment in stderr, stderr


RECIPE_CASES = {
    "duplicate key": ("stage: sft\nname: a\nname: b\nmodel:\n  base: m\ndata:\n  card: c.yaml\n",
                      ("recipe.yaml:3", "'name' is given twice (first on line 2)")),
    "alias bomb": (alias_bomb() + "stage: sft\n", ("recipe.yaml", "expands to", "aliases")),
    "deep nesting": ("stage: sft\ndescription: " + "[" * 5000 + "]" * 5000 + "\n", ("recipe.yaml", "nested")),
    "moderately deep": ("stage: sft\ndescription: " + "[" * 100 + "]" * 100 + "\n", ("recipe.yaml:2", "nested")),
    "huge wrong value": ("stage: sft\nname: a\nmodel:\n  base: m\ndata:\n  card: c.yaml\ntrain:\n  seed: "
                         + "x" * 1_000_000 + "\n", ("recipe.yaml:8", "train.seed", "...")),
    "max_steps 0": ("stage: sft\nname: a\nmodel:\n  base: m\ndata:\n  card: c.yaml\ntrain:\n  max_steps: 0\n",
                    ("recipe.yaml:8", "train.max_steps", "0 is not a step count")),
    "max_steps -5": ("stage: sft\nname: a\nmodel:\n  base: m\ndata:\n  card: c.yaml\ntrain:\n  max_steps: -5\n",
                     ("train.max_steps", "-1 to train for num_train_epochs")),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_shapes_that_are_refused(case: str, tmp_path: Path, run_align: Callable) -> None:
    text, fragments = RECIPE_CASES[case]
    (tmp_path / "recipe.yaml").write_text(text)
    refused(run_align("recipe", "validate", tmp_path / "recipe.yaml", timeout=60), *fragments)


@pytest.mark.parametrize(("value", "fragments"), [
    ("lora.target_modules=[q_proj, v_proj", ("--set lora.target_modules=", "YAML syntax error", "quote it")),
    ("train.max_steps=0", ("--set train.max_steps=0", "0 is not a step count")),
])
def test_set_values_that_are_refused(value: str, fragments: tuple[str, ...], run_align: Callable) -> None:
    refused(run_align("recipe", "show", TINY_SFT, "--set", value, timeout=60), *fragments)


def test_flow_style_alias_bomb_in_set_is_bounded(run_align: Callable) -> None:
    bomb = "{" + ", ".join(alias_bomb().splitlines()) + "}"
    refused(run_align("recipe", "show", TINY_SFT, "--set", f"sft={bomb}", timeout=60), "--set sft=", "expands to")


def test_minus_one_still_means_epochs(run_align: Callable) -> None:
    result = run_align("recipe", "show", TINY_SFT, "--set", "train.max_steps=-1")
    assert result.returncode == 0 and "max_steps: -1" in result.stdout, result.stderr


@pytest.mark.parametrize("case", ["duplicate key", "alias bomb"])
def test_card_shapes_that_are_refused(case: str, tmp_path: Path, run_align: Callable) -> None:
    text = CARD.replace("name: c\n", "name: c\nname: d\n") if case == "duplicate key" else alias_bomb() + CARD
    (tmp_path / "card.yaml").write_text(text)
    (tmp_path / "rows.jsonl").write_text("")
    fragments = ("card.yaml:2", "'name' is given twice") if case == "duplicate key" else ("card.yaml", "expands to")
    refused(run_align("data", "validate", tmp_path / "card.yaml", timeout=60), *fragments)


@pytest.mark.parametrize(("start", "fragments"), [
    ("tiny-rm@v1", ("model.from: tiny-rm@v1 is a reward artifact", "reward_model")),
    ("tiny-pairs@v1", ("model.from: tiny-pairs@v1 is a dataset artifact", "data.card")),
])
def test_a_stage_starts_only_from_a_policy(start: str, fragments: tuple[str, ...], reward_artifact: Path,
                                           sft_registry: Path, run_align: Callable) -> None:
    """A DPO recipe starting from a reward artifact once merged the reward adapter into a causal LM, trained and
    published; a dataset artifact asked for sentencepiece. Both are refused by kind, before any weights load."""
    for command in (["recipe", "validate"], ["dpo"]):
        result = run_align(*command, TINY_DPO, "--set", f"model.from={start}", "--set", "name=from-wrong-kind",
                           "--registry", sft_registry)
        refused(result, *fragments)
    assert not (sft_registry / "from-wrong-kind").exists()


# ---- the catalogue: every command and stage, in-process through `align.cli.main` --------------------------------
# Each case runs the real entry point (`main(argv)`, what the console script calls) with ALIGN_FORBID_WEIGHTS set,
# so a refusal that came after a weight load fails as a RuntimeError instead of passing. In-process keeps the
# ~70 cases to seconds; the subprocess tests above cover the same entry point end to end.

TINY = REPO / "recipes" / "tiny"
SFT, PAIRS, REWARD, DPO, PPO, GRPO, RLOO = (str(TINY / f"{s}.yaml") for s in
                                            ("sft", "pairs", "reward", "dpo", "ppo", "grpo", "rloo"))
KTO, ORPO, SIMPO = (str(TINY / f"{s}.yaml") for s in ("kto", "orpo", "simpo"))
UNPAIRED_ROW = '{"prompt": "Once", "completion": " upon a time", "label": %s}\n'
GOOD_ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
CARD_OF = "name: c\ndescription: d\nlicense: MIT\nsource:\n  path: rows.jsonl\nformat: {fmt}\n"


def recipe_text(**sections: str) -> str:
    """A tiny sft recipe with some top-level sections replaced (for shape errors that --set cannot express)."""
    base = {"stage": "sft", "name": "bad", "model": f"\n  base: {REPO.parent / 'shared/models/stories260K'}",
            "data": f"\n  card: {REPO / 'data_cards/tiny-sft.yaml'}"}
    base.update(sections)
    return "".join(f"{key}: {value}\n" for key, value in base.items() if value is not None)


# id -> (argv, files to write in tmp, fragments the message must contain). In argv, {tmp} is the case's directory
# and {reg} the session registry (tiny-sft, tiny-pairs, tiny-rm, tiny-dpo). Stage commands get --registry {reg}.
CATALOGUE: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
    # recipes: files and shapes
    "recipe missing": (["sft", "{tmp}/nope.yaml"], {}, ("nope.yaml", "not found")),
    "recipe is a directory": (["sft", "{tmp}"], {}, ("Is a directory",)),
    "recipe empty": (["recipe", "validate", "{tmp}/r.yaml"], {"r.yaml": ""}, ("r.yaml",)),
    "recipe is a list": (["recipe", "validate", "{tmp}/r.yaml"], {"r.yaml": "- a\n- b\n"}, ("r.yaml", "mapping")),
    "recipe yaml syntax": (["sft", "{tmp}/r.yaml"], {"r.yaml": "stage: sft\nname: [a\n"}, ("r.yaml:",)),
    "recipe not utf-8": (["recipe", "validate", "{tmp}/r.yaml"], {"r.yaml": "stage: sft\nname: \udcff\n"},
                         ("r.yaml",)),
    "unknown top key": (["recipe", "validate", "{tmp}/r.yaml"], {"r.yaml": recipe_text(trian="\n  seed: 1")},
                        ("trian", "did you mean 'train'")),
    "unknown stage": (["recipe", "validate", "{tmp}/r.yaml"], {"r.yaml": recipe_text(stage="kpo")},
                      ("stage", "kpo")),
    "section of another stage": (["recipe", "validate", "{tmp}/r.yaml"],
                                 {"r.yaml": recipe_text(dpo="\n  beta: 0.1")}, ("dpo",)),
    "name missing": (["recipe", "validate", "{tmp}/r.yaml"], {"r.yaml": recipe_text(name=None)}, ("name",)),
    "name with a slash": (["sft", SFT, "--set", "name=a/b"], {}, ("a/b",)),
    "base and from both": (["recipe", "validate", "{tmp}/r.yaml"],
                           {"r.yaml": recipe_text(model="\n  base: x\n  from: tiny-sft@v1")}, ("model",)),
    "neither base nor from": (["recipe", "validate", "{tmp}/r.yaml"],
                              {"r.yaml": recipe_text(model="\n  chat_template: auto")}, ("model",)),
    # --set
    "set without equals": (["recipe", "show", SFT, "--set", "train.seed"], {}, ("--set", "train.seed")),
    "set unknown key": (["sft", SFT, "--set", "train.learnig_rate=1"], {}, ("learnig_rate", "learning_rate")),
    "set wrong type": (["sft", SFT, "--set", "train.learning_rate=fast"], {}, ("train.learning_rate",)),
    "set lora r zero": (["sft", SFT, "--set", "lora.r=0"], {}, ("lora.r",)),
    "set negative lr": (["sft", SFT, "--set", "train.learning_rate=-1"], {}, ("train.learning_rate",)),
    "set bad precision": (["sft", SFT, "--set", "train.precision=fp8"], {}, ("train.precision",)),
    # model references
    "base path missing": (["sft", SFT, "--set", "model.base=./no/such/model"], {}, ("model.base", "does not exist")),
    "base is a plain file": (["sft", SFT, "--set", "model.base={tmp}/weights.txt"], {"weights.txt": "x"},
                             ("model.base", "not a .gguf")),
    "base dir without config": (["sft", SFT, "--set", "model.base={tmp}"], {"x.txt": ""}, ("config.json",)),
    "base hub id offline": (["sft", SFT, "--set", "model.base=nobody/no-such-model"], {},
                            ("nobody/no-such-model",)),
    "from unknown artifact": (["dpo", DPO, "--set", "model.from=nosuch@v1"], {}, ("nosuch",)),
    "from malformed ref": (["dpo", DPO, "--set", "model.from=tiny-sft@3"], {}, ("tiny-sft@3", "tiny-sft@v3")),
    "from missing version": (["dpo", DPO, "--set", "model.from=tiny-sft@v99"], {}, ("tiny-sft@v99", "latest")),
    "from a reward artifact": (["sft", SFT, "--set", "model.base=null", "--set", "model.from=tiny-rm@v1"], {},
                               ("model.from", "reward artifact")),
    "from a dataset artifact": (["ppo", PPO, "--set", "model.from=tiny-pairs@v1"], {},
                                ("model.from", "dataset artifact")),
    # LoRA that matches nothing: seen from the model's config on the meta device, before any weight loads
    "lora targets nothing": (["sft", SFT, "--set", "lora.target_modules=[qproj]"], {},
                             ("lora.target_modules", "qproj", "q_proj")),
    "lora layers out of range": (["dpo", DPO, "--set", "lora.target_modules=[q_proj]", "--set",
                                  "lora.layers_to_transform=[40]"], {}, ("layers", "[40]")),
    "lora regex targets nothing": (["reward", REWARD, "--set", "lora.target_modules=nothing.*"], {},
                                   ("lora.target_modules", "nothing.*")),
    # QLoRA and GPU kernels: refused before any weight loads
    "quantization of a gguf base": (["sft", SFT, "--set", "model.base={tmp}/m.gguf", "--set",
                                     "model.quantization.bits=4"], {"m.gguf": "x"}, ("model.quantization", "GGUF")),
    "quantization for pairs": (["recipe", "validate", PAIRS, "--set", "model.quantization.bits=4"], {},
                               ("model.quantization", "align pairs")),
    "quantization 8-bit with nf4": (["sft", SFT, "--set", "model.quantization.bits=8", "--set",
                                     "model.quantization.quant_type=nf4"], {}, ("quant_type", "bits: 4 only")),
    "attention kernel unknown": (["sft", SFT, "--set", "model.attn_implementation=flash"], {},
                                 ("model.attn_implementation",)),
    "liger kernels here": (["sft", SFT, "--set", "train.use_liger_kernel=true"], {}, ("train.use_liger_kernel",)),
    # data cards named by recipes
    "card missing": (["sft", SFT, "--set", "data.card={tmp}/none.yaml"], {}, ("none.yaml",)),
    "card artifact missing": (["dpo", DPO, "--set", "data.card=tiny-pairs@v7"], {}, ("tiny-pairs@v7",)),
    "card of the wrong rows": (["reward", REWARD, "--set", "data.card=" + str(REPO / "data_cards/tiny-sft.yaml")],
                               {}, ("align reward", "chosen/rejected pairs")),
    "prompts card for sft": (["sft", SFT, "--set",
                              "data.card=" + str(REPO / "data_cards/tiny-story-prompts.yaml")], {},
                             ("align sft", "conversations")),
    # stage sections
    "tracker unknown": (["sft", SFT, "--set", "train.report_to=[tensorbored]"], {}, ("train.report_to",
                                                                                    "tensorbored")),
    "tracker all": (["dpo", DPO, "--set", "train.report_to=all"], {}, ("train.report_to", "'all'",
                                                                       "supported: none, tensorboard")),
    "accelerate config missing": (["sft", SFT, "--set", "launch.num_processes=2", "--set",
                                   "launch.accelerate_config={tmp}/acc.yaml"], {}, ("acc.yaml",)),
    "dpo beta negative": (["dpo", DPO, "--set", "dpo.beta=-0.1"], {}, ("dpo.beta",)),
    "ppo no reward": (["ppo", PPO, "--set", "ppo.reward_model=null"], {}, ("reward",)),
    "ppo reward is a policy": (["ppo", PPO, "--set", "ppo.reward_model=tiny-sft@v1"], {},
                               ("tiny-sft@v1", "reward")),
    "ppo reward function unimportable": (["ppo", PPO, "--set", "ppo.reward_function=no_such_mod:score"], {},
                                         ("no_such_mod",)),
    "ppo rollout batch not divisible": (["ppo", PPO, "--set", "ppo.rollout_batch_size=50"], {},
                                        ("rollout_batch_size",)),
    "grpo generations do not divide": (["grpo", GRPO, "--set", "grpo.num_generations=5"], {},
                                       ("num_generations",)),
    "rloo reward is a dataset": (["rloo", RLOO, "--set", "rloo.reward_model=tiny-pairs@v1"], {},
                                 ("tiny-pairs@v1",)),
    "kto loss type unknown": (["kto", KTO, "--set", "kto.loss_type=kto_pair"], {}, ("kto.loss_type",)),
    "kto weight zero": (["kto", KTO, "--set", "kto.desirable_weight=0"], {}, ("kto.desirable_weight",)),
    "kto batch of one": (["kto", KTO, "--set", "train.per_device_train_batch_size=1"], {},
                         ("per_device_train_batch_size", "at least 2 rows")),
    "kto card of sft rows": (["kto", KTO, "--set", "data.card=" + str(REPO / "data_cards/tiny-sft.yaml")], {},
                             ("align kto", "replies rated desirable/undesirable")),
    "kto from a reward artifact": (["kto", KTO, "--set", "model.from=tiny-rm@v1"], {},
                                   ("model.from", "reward artifact")),
    "kto section in a dpo recipe": (["recipe", "validate", DPO, "--set", "kto.beta=0.2"], {},
                                    ("section 'kto' does not apply to stage 'dpo'",)),
    "orpo beta negative": (["orpo", ORPO, "--set", "orpo.beta=-1"], {}, ("orpo.beta",)),
    "orpo card of unpaired rows": (["orpo", ORPO, "--set", "data.card={tmp}/card.yaml"],
                                   {"card.yaml": CARD_OF.format(fmt="unpaired"), "rows.jsonl": UNPAIRED_ROW % "true"},
                                   ("align orpo", "chosen/rejected pairs")),
    "simpo gamma negative": (["simpo", SIMPO, "--set", "simpo.gamma=-0.5"], {}, ("simpo.gamma",)),
    "simpo card of prompts": (["simpo", SIMPO, "--set",
                               "data.card=" + str(REPO / "data_cards/tiny-story-prompts.yaml")], {},
                              ("align simpo", "chosen/rejected pairs")),
    "simpo dpo section": (["recipe", "validate", SIMPO, "--set", "dpo.beta=0.2"], {},
                          ("section 'dpo' does not apply to stage 'simpo'",)),
    "unpaired integer label": (["data", "validate", "{tmp}/card.yaml"],
                               {"card.yaml": CARD_OF.format(fmt="unpaired"), "rows.jsonl": UNPAIRED_ROW % "1"},
                               ("integer label 1", "label_map")),
    "unpaired label unreadable": (["data", "validate", "{tmp}/card.yaml"],
                                  {"card.yaml": CARD_OF.format(fmt="unpaired"), "rows.jsonl": UNPAIRED_ROW % '"meh"'},
                                  ("rows.jsonl:1", "label must be true/false")),
    "pairs judge unknown": (["pairs", PAIRS, "--set", "pairs.judge=vaderr"], {}, ("vaderr",)),
    "pairs judge is a policy": (["pairs", PAIRS, "--set", "pairs.judge=reward:tiny-sft@v1"], {},
                                ("tiny-sft@v1",)),
    "pairs judge without function": (["recipe", "validate", PAIRS, "--set", "pairs.judge=json:no_such_function"],
                                     {}, ("pairs.judge", "no_such_function")),
    # data cards themselves
    "card yaml syntax": (["data", "validate", "{tmp}/card.yaml"], {"card.yaml": "name: [c\n"}, ("card.yaml:",)),
    "card unknown format": (["data", "validate", "{tmp}/card.yaml"],
                            {"card.yaml": CARD_OF.format(fmt="chatml-ish"), "rows.jsonl": GOOD_ROW},
                            ("chatml-ish",)),
    "card without license": (["data", "validate", "{tmp}/card.yaml"],
                             {"card.yaml": CARD_OF.format(fmt="messages").replace("license: MIT\n", ""),
                              "rows.jsonl": GOOD_ROW}, ("license",)),
    "card source missing": (["data", "validate", "{tmp}/card.yaml"], {"card.yaml": CARD_OF.format(fmt="messages")},
                            ("rows.jsonl",)),
    "card unknown key": (["data", "validate", "{tmp}/card.yaml"],
                         {"card.yaml": CARD_OF.format(fmt="messages") + "licence: MIT\n", "rows.jsonl": GOOD_ROW},
                         ("licence",)),
    "data bad json line": (["data", "validate", "{tmp}/card.yaml"],
                           {"card.yaml": CARD_OF.format(fmt="messages"), "rows.jsonl": GOOD_ROW + "{oops\n"},
                           ("card.yaml", "malformed row")),
    "data empty file": (["data", "preview", "{tmp}/card.yaml"],
                        {"card.yaml": CARD_OF.format(fmt="messages"), "rows.jsonl": ""}, ("rows.jsonl",)),
    "card sha256 mismatch": (["data", "validate", "{tmp}/card.yaml"],
                             {"card.yaml": CARD_OF.format(fmt="messages") + "sha256:\n  rows.jsonl: " + "0" * 64
                              + "\n", "rows.jsonl": GOOD_ROW}, ("rows.jsonl", "sha256")),
    "preview of a policy artifact": (["data", "preview", "tiny-sft@v1", "--registry", "{reg}"], {},
                                     ("tiny-sft@v1",)),
    # artifacts, eval, score, export, compare, report
    "show unknown name": (["artifacts", "show", "tiny-sfx", "--registry", "{reg}"], {}, ("tiny-sfx", "tiny-sft")),
    "show bad version spec": (["artifacts", "show", "tiny-sft@vv", "--registry", "{reg}"], {}, ("tiny-sft@vv",)),
    "lineage of a missing path": (["artifacts", "lineage", "{tmp}/nowhere", "--registry", "{reg}"], {},
                                  ("nowhere", "does not exist")),
    "show a directory without manifest": (["artifacts", "show", "{tmp}", "--registry", "{reg}"], {"a.txt": ""},
                                          ("manifest.json",)),
    "eval a reward artifact": (["eval", "tiny-rm@v1", "--data", str(REPO / "data_cards/tiny-story-prompts.yaml"),
                                "--registry", "{reg}"], {}, ("tiny-rm@v1", "policy")),
    "eval reward is a policy": (["eval", "tiny-sft@v1", "--data",
                                 str(REPO / "data_cards/tiny-story-prompts.yaml"), "--reward", "tiny-sft@v2",
                                 "--registry", "{reg}"], {}, ("tiny-sft@v2",)),
    "eval judge unknown": (["eval", "tiny-sft@v1", "--data", str(REPO / "data_cards/tiny-story-prompts.yaml"),
                            "--judge", "vadr", "--registry", "{reg}"], {}, ("vadr",)),
    "eval card missing": (["eval", "tiny-sft@v1", "--data", "{tmp}/none.yaml", "--registry", "{reg}"], {},
                          ("none.yaml",)),
    "score a policy": (["score", "tiny-sft@v1", "--prompt", "hi", "--response", "there", "--registry", "{reg}"], {},
                       ("tiny-sft@v1",)),
    "score without rows": (["score", "tiny-rm@v1", "--registry", "{reg}"], {}, ("--data", "--prompt")),
    "export a dataset": (["export", "tiny-pairs@v1", "--merge", "{tmp}/out", "--registry", "{reg}"], {},
                         ("tiny-pairs@v1",)),
    "export over a file": (["export", "tiny-sft@v1", "--merge", "{tmp}/f", "--registry", "{reg}"], {"f": "x"},
                           ("f",)),
    "chat with a reward artifact": (["chat", "tiny-rm@v1", "--prompt", "hi", "--registry", "{reg}"], {},
                                    ("tiny-rm@v1", "reward artifact", "policy")),
    "chat with a dataset artifact": (["chat", "tiny-pairs@v1", "--registry", "{reg}"], {},
                                     ("tiny-pairs@v1", "dataset artifact")),
    "chat with an unknown ref": (["chat", "nosuch@v1", "--prompt", "hi", "--registry", "{reg}"], {}, ("nosuch",)),
    "compare without eval": (["compare", "tiny-sft@v1", "--registry", "{reg}"], {}, ("tiny-sft@v1", "eval")),
    "bench-eval a reward artifact": (["bench-eval", "tiny-rm@v1", "--tasks", "x", "--registry", "{reg}"], {},
                                     ("tiny-rm@v1", "policy")),
    "bench-eval a dataset artifact": (["bench-eval", "tiny-pairs@v1", "--tasks", "x", "--registry", "{reg}"], {},
                                      ("tiny-pairs@v1", "policy")),
    "bench-eval include path missing": (["bench-eval", "tiny-sft@v1", "--tasks", "x", "--include-path",
                                         "{tmp}/tasks", "--registry", "{reg}"], {},
                                        ("--include-path", "tasks", "not a directory")),
    "bench-eval no task named": (["bench-eval", "tiny-sft@v1", "--tasks", " , ", "--registry", "{reg}"], {},
                                 ("--tasks",)),
    "report of an unknown ref": (["report", "nosuch@v1", "--out", "{tmp}/r.html", "--registry", "{reg}"], {},
                                 ("nosuch",)),
    # usage errors: typer's usage message, exit 2
    "unknown command": (["ktoo", SFT], {}, ("No such command",)),
    "unknown option": (["sft", "--nosuch", SFT], {}, ("No such option",)),
    "missing argument": (["score"], {}, ("Missing argument",)),
    "bad option value": (["eval", "tiny-sft@v1", "--data", "x.yaml", "--limit", "0"], {}, ("--limit",)),
}

STAGE_COMMANDS = {"sft", "pairs", "reward", "dpo", "kto", "orpo", "simpo", "ppo", "grpo", "rloo"}


def published(registry: Path) -> set[str]:
    """Every version directory and staging directory under the registry."""
    return {str(p.relative_to(registry)) for p in registry.glob("*/*") if p.name.startswith(("v", ".staging-"))}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue_of_bad_inputs(case: str, tmp_path: Path, reward_artifact: Path, sft_registry: Path,
                                 capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.cli import main

    argv, files, fragments = CATALOGUE[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8", errors="surrogateescape")
    argv = [arg.format(tmp=tmp_path, reg=sft_registry) for arg in argv]
    if argv[0] in STAGE_COMMANDS or argv[:2] == ["recipe", "validate"]:
        argv += ["--registry", str(sft_registry)]
    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")  # a refusal after a weight load raises instead of passing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ALIGN_REGISTRY", raising=False)
    before = published(sft_registry)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2, stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr) < 2000, stderr[-2000:]
    for fragment in fragments:
        assert fragment in stderr, stderr
    assert published(sft_registry) == before, "a refused command must publish nothing and leave no staging"


def test_catalogue_spans_every_command() -> None:
    import typer.main

    from align.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    covered = {argv[0] for argv, _, _ in CATALOGUE.values()}
    assert commands <= covered, f"no bad-input case for: {commands - covered}"
    assert len(CATALOGUE) >= 60
