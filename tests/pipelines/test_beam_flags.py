"""Flags handed on to Beam: a typo of lookalike's own, or of Beam's, is refused with what was meant."""

from __future__ import annotations

import pytest

from pipelines.beam_flags import check_beam_args
from pipelines.embed_config import EMBED_OPTIONS


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--runner=DataflowRunner", "--project", "p", "--region=us-central1", "--experiments=use_runner_v2"],
        ["--direct_num_workers=2", "--direct_running_mode", "multi_processing", "--save_main_session"],
        ["--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1"],
    ],
)
def test_beams_own_flags_pass(args):
    check_beam_args(args, EMBED_OPTIONS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sise", "32"], "unknown option --batch-sise: neither lookalike's nor Beam's; did you mean --batch-size?"),
        (["--runer=DataflowRunner"], "unknown option --runer: neither lookalike's nor Beam's; did you mean --runner?"),
        (["--project=p", "extra"], "unexpected argument 'extra'"),
        (["--zzzzzz"], "unknown option --zzzzzz: neither lookalike's nor Beam's$"),
    ],
)  # fmt: skip
def test_a_flag_neither_knows_is_refused_with_what_was_meant(args, message):
    with pytest.raises(ValueError, match=message):
        check_beam_args(args, EMBED_OPTIONS)


def test_a_hint_says_where_another_commands_option_belongs():
    with pytest.raises(ValueError, match="unknown option --batch-size: in the config$"):
        check_beam_args(["--batch-size=32"], ["--step"], {"--batch-size": "in the config"})


def test_a_typo_stops_the_command_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """`lookalike embed --batch-sise 32` ran a whole catalog at the default batch size, Beam having only logged
    "Unparseable argument"; a nightly's `--stpe index` ran every step."""
    import pipelines.cli
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.csv").write_text("item_id,image_uri\na,a.jpg\n")
    assert main(["embed", "--catalog", "c.csv", "--model", "m", "--out", "o", "--batch-sise", "32"]) == 2
    assert capsys.readouterr().err.endswith("did you mean --batch-size?\n")
    night = ["nightly", "--catalog", "c.csv", "--model", "m", "--out", "o", "--interactions", "i.csv"]
    assert main([*night, "--stpe", "index"]) == 2
    assert (
        capsys.readouterr().err
        == "error: unknown option --stpe: neither lookalike's nor Beam's; did you mean --step?\n"
    )
    assert main([*night, "--batch-size", "32"]) == 2
    assert "a night's embed settings are its config's (embed: {batch_size: ...})" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
