"""The ``respec`` command line: every subcommand parses, runs on a tiny model, and reports bad input clearly."""

from __future__ import annotations

import json

import pytest
import torch

from respec.cli import build_parser, main

SUBCOMMANDS = (["generate"], ["bench"], ["drafter", "train"], ["drafter", "export"], ["audit"], ["train"], ["report"],
               ["demo"])


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


@pytest.mark.parametrize("override, field", [
    ("optim.lr=inf", "optim.lr"), ("rollout.temperature=.inf", "rollout.temperature"), ("task.levels=[4]", "task.levels"),
    ("device=bogus", "device"), ("task.name=gsm8k", "task.path"),
])
def test_train_refuses_bad_settings_in_one_line_before_the_model_loads(override, field, capsys, monkeypatch):
    """``model`` names nothing that exists: reaching the model load would fail differently."""
    monkeypatch.delenv("RESPEC_GSM8K", raising=False)
    assert main(["train", "model=/nonexistent/model", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"respec: error: {field}: ") and err.count("\n") == 1


def test_train_refuses_a_directory_holding_another_run_and_a_missing_file(tiny_llama, tmp_path, capsys):
    common = [f"model={tiny_llama}", f"out_dir={tmp_path / 'run'}", "steps=1", "eval_every=0",
              "rollout.speculative=off", "rollout.prompts_per_step=1", "rollout.group_size=2",
              "rollout.max_new_tokens=4", "task.num_train=8", "task.num_eval=2"]
    assert main(["train", *common]) == 0
    assert main(["train", *common, "seed=3"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert main(["train", *common, "steps=1", "--resume"]) == 2
    assert "raise steps to continue" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_an_os_error_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "file").write_text("")  # out_dir below a file: creating it raises NotADirectoryError
    assert main(["train", "rollout.speculative=off", f"out_dir={tmp_path / 'file' / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("respec: error: ") and "Traceback" not in err and err.count("\n") == 1


def test_drafter_export_writes_the_standard_layout_and_refuses_a_broken_head(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file

    from respec.models.eagle_format import save_eagle_head
    from respec.models.loading import load_model
    from tests.helpers import random_head

    model, _ = load_model(tiny_llama)
    save_eagle_head(random_head(model, draft_vocab_size=16), tmp_path / "head", model)
    assert main(["drafter", "export", str(tmp_path / "head"), str(tmp_path / "out"), "--model", str(tiny_llama)]) == 0
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16
    (tmp_path / "head" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["drafter", "export", str(tmp_path / "head"), str(tmp_path / "out2"), "--model", str(tiny_llama)]) == 2
    assert "drafter: cannot read" in capsys.readouterr().err and not (tmp_path / "out2").exists()
