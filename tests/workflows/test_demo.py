"""`nvila demo` end to end on tiny sizes: it trains, evaluates, and says plainly when its clock budget cut
training short (the accuracy of such a run is not the recipe's)."""

from nvila.workflows.demo import run_demo


def test_a_demo_cut_short_by_its_clock_says_so(tmp_path, tiny_overrides, capsys):
    figures = run_demo(str(tmp_path / "demo"), train_samples=256, val_samples=16, show=2, extra_args=[
        *tiny_overrides, "--trainer.max_steps=100000", "--trainer.max_time=00:00:00:03",
        "--trainer.val_check_interval=100000", "--data.batch_size=8", "--data.num_workers=0", "--model.max_length=64"])
    out = capsys.readouterr().out
    assert f"Training stopped early, at step {figures['steps']} of 100000" in out
    assert "--trainer.max_time=null" in out and "Held-out accuracy:" in out
    assert 0 < figures["steps"] < 100000 and 0 <= figures["accuracy"] <= 1
