"""The ``respec`` command line: every subcommand parses, runs on a tiny model, and reports bad input clearly."""

from __future__ import annotations

import json

import pytest

from respec.cli import build_parser, main

SUBCOMMANDS = (["generate"], ["bench"], ["drafter", "train"], ["audit"], ["train"], ["report"], ["demo"])


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: respec" in capsys.readouterr().out


def test_generate_prints_every_sample(tiny_llama, capsys):
    code = main(["generate", "--model", str(tiny_llama), "--n", "2", "--max-new-tokens", "4",
                 "--temperature", "0", "--no-chat", "--no-progress", "hello world"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[sample 0, " in out and "[sample 1, " in out


@pytest.mark.parametrize("speculation", [["--drafter", "ngram", "--speculative", "2"],
                                         ["--drafter", "ngram,self:1", "--speculative", "adaptive"]])
def test_generate_speculates_and_prints_what_plain_decoding_prints(tiny_llama, speculation, capsys):
    argv = ["generate", "--model", str(tiny_llama), "--max-new-tokens", "12", "--temperature", "0", "--no-chat",
            "--no-progress", "hello world", "the quick brown fox"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, *speculation]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize(("argv", "field"), [
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--n", "0", "hi"], "n"),
    (["generate", "--speculative", "3", "hi"], "speculative"),
    (["generate", "--drafter", "ngram", "--speculative", "sometimes", "hi"], "speculative"),
    (["bench", "--spec"], "drafters"),
    (["bench", "--adaptive"], "drafters"),
    (["train", "rollout.temperature=-1"], "rollout.temperature"),
    (["train", "rollout.no_such_field=1"], "rollout.no_such_field"),
])
def test_bad_input_exits_2_naming_the_field(argv, field, tiny_llama, capsys):
    if argv[0] == "generate":
        argv = [argv[0], "--model", str(tiny_llama), "--no-progress", *argv[1:]]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("respec: error: ") and field in err


def test_unknown_model_is_named(capsys):
    assert main(["generate", "--model", "no-such-preset", "hi"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "1,x", ""])
def test_bad_batch_sizes_are_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--batch-sizes", value])
    assert exit_info.value.code == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_bench_results_are_written_into_a_folder_that_does_not_exist_yet(tmp_path, capsys):
    from respec.cli import _report

    out = tmp_path / "runs" / "new" / "bench.json"
    assert _report("table", {"rows": [1]}, str(out)) == 0
    assert json.loads(out.read_text()) == {"rows": [1]}
    assert "wrote" in capsys.readouterr().out
