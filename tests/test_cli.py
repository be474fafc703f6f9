"""Every command line of the project documents every option: `--help` of each script and
subcommand lists each field of its Args (nested judge options included) with the field's own
docstring. Docstrings are read from the source the way tyro reads them, so a field without one,
or a help page that drops it, fails here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import shlex
import textwrap
import typing
from pathlib import Path

import pytest
import tyro

import annotate
import evaluate
import judge
import perception_rewards
import train_grpo
from demo import demo_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def field_docs(cls) -> dict[str, str]:
    """{field: docstring} of a dataclass and its dataclass bases: the string literal right below
    each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for field, below in zip(body, body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(below, ast.Expr)
                    and isinstance(below.value, ast.Constant) and isinstance(below.value.value, str)):
                docs[field.target.id] = below.value.value
    return docs


def documented_options(cls, prefix: str = "") -> list[tuple[str, str]]:
    """(option, first words of its docstring) for every field, nested dataclasses flattened."""
    docs, hints, out = field_docs(cls), typing.get_type_hints(cls, include_extras=True), []
    for f in dataclasses.fields(cls):
        assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
        words = " ".join(docs[f.name].split()[:4])
        if dataclasses.is_dataclass(hints[f.name]):
            out += documented_options(hints[f.name], prefix + f.name + ".")
        elif "Positional" in repr(hints[f.name]):  # shown by position (e.g. RUN_A), not as --name
            out.append((None, words))
        else:
            out.append(("--" + (prefix + f.name).replace("_", "-"), words))
    return out


def help_text(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    return " ".join(text.replace("│", " ").split())


CLIS = [  # (name, callable taking argv, argv, Args class)
    ("train_grpo.py", lambda argv: train_grpo.main(tyro.cli(train_grpo.Args, args=argv)), [],
     train_grpo.Args),
    *[(f"evaluate.py {name}", evaluate.main, [name], cls) for name, (cls, _) in evaluate.SUBCOMMANDS.items()],
    *[(f"judge.py {name}", judge.main, [name], cls) for name, (cls, _) in judge.SUBCOMMANDS.items()],
    *[(f"annotate.py {name}", annotate.main, [name], cls) for name, cls in annotate.STAGES.items()],
    ("demo/tiny_model.py", lambda argv: tiny_model.main(tyro.cli(tiny_model.Args, args=argv)), [],
     tiny_model.Args),
    ("demo/demo_data.py", lambda argv: demo_data.main(tyro.cli(demo_data.Args, args=argv)), [],
     demo_data.Args),
]


@pytest.mark.parametrize("name, main, argv, cls", CLIS, ids=[c[0] for c in CLIS])
def test_help_documents_every_option_with_its_docstring(name, main, argv, cls, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: docstrings are not wrapped
    text = help_text(main, argv + ["--help"], capsys)
    for option, words in documented_options(cls):
        assert option is None or option in text, (name, option)
        assert words in text, (name, option, words)


def test_top_level_help_lists_the_subcommands(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    for main, names in ((evaluate.main, evaluate.SUBCOMMANDS), (judge.main, judge.SUBCOMMANDS),
                        (annotate.main, annotate.STAGES)):
        text = help_text(main, ["--help"], capsys)
        assert all(n in text for n in names)
    with pytest.raises(SystemExit) as e:
        annotate.main(["nonsense"])
    assert e.value.code != 0


def test_paper_defaults_cite_their_source():
    """Every hyperparameter whose default is the paper's says so: each field of train_grpo.Args
    that the README's paper table lists cites the official value in its docstring."""
    docs = field_docs(train_grpo.Args)
    for name in ("group_size", "prompts_per_step", "epochs", "temperature", "top_p", "ppo_epochs", "clip_eps_low",
                 "clip_eps_high", "dual_clip", "loss_agg", "adv_eps", "kl_coef", "w_acc", "w_fmt", "w_vis",
                 "rep_ngram", "rep_max_penalty", "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm",
                 "min_pixels", "max_pixels", "max_prompt_length", "max_response_length", "val_every",
                 "val_before_train"):
        assert "official" in docs[name].lower(), name


# ---------------------------------------------------------------------------------------------
# Every command line the documentation shows parses with the script's own parser
# ---------------------------------------------------------------------------------------------
def doc_command_lines() -> list[tuple[str, str]]:
    """(where, command) for every `python ...` / `accelerate launch ...` line of README.md's code
    blocks and of the scripts' header docstrings, continuation lines joined, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    texts = {"README.md": "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S))}
    for module in (train_grpo, evaluate, judge, annotate, perception_rewards, demo_data, tiny_model):
        texts[Path(module.__file__).name] = module.__doc__
    found = []
    for where, text in texts.items():
        for line in re.sub(r"\\\n", " ", text).splitlines():
            start = re.search(r"(?:^|\s)((?:\S*python3?|accelerate launch) .*)", line)
            if start:
                found.append((where, start.group(1)))
    return found


def parse_command(command: str):
    """Parse one documented command with the parser its script uses; returns the parsed Args."""
    words = shlex.split(command, comments=True)
    subcommands = {"train_grpo.py": None, "evaluate.py": evaluate.SUBCOMMANDS, "judge.py": judge.SUBCOMMANDS,
                   "annotate.py": {name: (cls, None) for name, cls in annotate.STAGES.items()}}
    modules = {"demo.demo_data": demo_data.Args, "demo.tiny_model": tiny_model.Args}
    for i, word in enumerate(words):
        if word == "--config_file":  # accelerate's config: a file of this repository
            assert (ROOT / words[i + 1]).is_file(), words[i + 1]
        script = next((s for s in subcommands if word.endswith(s)), None)
        if script or word in modules:
            # "..." stands for "more options" after a value, not for a value itself
            argv = [w for j, w in enumerate(words[i + 1:]) if w != "..." or words[i + j].startswith("-")]
            if word in modules:
                return tyro.cli(modules[word], args=argv)
            if subcommands[script] is None:
                return tyro.cli(train_grpo.Args, args=argv)
            return tyro.extras.subcommand_cli_from_dict({n: c for n, (c, _) in subcommands[script].items()},
                                                        args=argv)
    return None  # another program (vllm serve, pip, ...)


def test_every_documented_command_line_parses(capsys, tmp_path, monkeypatch):
    """A flag renamed or retyped in the code and not in the docs (e.g. a boolean flag that now wants
    a value) fails here, before a user's launch does."""
    commands = doc_command_lines()
    monkeypatch.chdir(tmp_path)  # the files the commands name with @FILE, as a user would have them
    for name in {m for _, c in commands for m in re.findall(r"@(\S+)", c)}:
        (tmp_path / name).write_text("An instruction.")
    parsed = 0
    for where, command in commands:
        try:
            parsed += parse_command(command) is not None
        except SystemExit:
            pytest.fail(f"{where}: this documented command does not parse:\n{command}\n{capsys.readouterr().err}")
    ours = [c for _, c in commands if re.search(r"(train_grpo|evaluate|judge|annotate)\.py|-m demo\.", c)]
    assert parsed == len(ours) >= 30, ours  # every launch line of ours was found and parsed
