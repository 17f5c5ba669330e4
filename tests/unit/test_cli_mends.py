"""Issue 19, finding 8, in process: progress in a log file is whole lines, and the run summary says when there
was no eval split. Real processes: tests/e2e/test_cli_mends.py."""
from __future__ import annotations

from fft_dist.progress import LineProgress, progress_bar
from fft_dist.rank import print_summary
from fft_dist.trainer import Summary


def test_progress_in_a_log_file_is_whole_lines_and_eval_lines_stand_alone(capsys):
    bar = progress_bar(total=4, initial=0, enabled=True, desc="train")
    assert isinstance(bar, LineProgress)  # pytest's stderr is not a terminal
    bar.every_s = 3600.0
    for step in range(4):
        bar.set_postfix(loss=f"{5 - step:.4f}", refresh=False)
        bar.update(1)
        if step == 1:
            bar.write("step 2: eval loss 4.5")
    bar.close()
    out, err = capsys.readouterr()
    assert "\r" not in err and out == "step 2: eval loss 4.5\n"
    lines = err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["train: step 1/4", "train: step 4/4"], err  # first, then last
    assert lines[-1].endswith("loss=2.0000")
    quiet = LineProgress(total=2, initial=0, enabled=False, desc="train")  # another rank: silent
    quiet.update(2)
    quiet.close()
    assert capsys.readouterr() == ("", "")


def test_the_summary_says_no_eval_split_instead_of_n_a(capsys):
    base = dict(steps=3, seconds=1.0, first_eval_loss=None, final_eval_loss=None, best_eval_loss=None, best_step=None,
                run_dir="r")
    print_summary(Summary(**base, eval_split=False))
    out = capsys.readouterr().out
    assert "eval loss: no eval split" in out and "n/a" not in out and "None" not in out
    print_summary(Summary(**{**base, "first_eval_loss": 2.0, "final_eval_loss": 1.0, "best_eval_loss": 1.0,
                             "best_step": 3}))
    assert "eval loss: first 2.0000 -> final 1.0000 (best 1.0000 at step 3)" in capsys.readouterr().out
