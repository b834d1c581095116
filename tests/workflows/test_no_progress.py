"""A run that can make no progress stops in its first epoch, names the cause, exits non-zero, exports nothing."""

from nvila.workflows.commands import main


def test_every_sample_too_long_stops_the_run_with_the_cause(tiny_fit_args, tmp_path, capsys):
    rc = main([*tiny_fit_args(tmp_path, steps=5), "--model.max_length=8", "--trainer.max_time=00:00:00:30"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "formed no batch: every sample was skipped (too_long:" in err and "model.max_length" in err
    assert not list(tmp_path.rglob("model.safetensors")), "an untrained checkpoint must not be exported"
