"""cli/trace.py as a user runs it: progress per recorded prompt, --chat-file (the old --chat FILE warned),
contradictory prompt flags refused before loading."""

import pytest

from hotexperts.cli import main
from hotexperts.trace.format import RoutingTrace

TINY = ["trace", "-m", "preset:tiny-qwen3-moe", "--dtype", "fp32", "--device", "cpu", "-n", "2"]


def test_recording_prints_progress_per_prompt(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\nworld\nagain\n")
    out = tmp_path / "t.npz"
    rc = main([*TINY, "--prompts", str(tmp_path / "p.txt"), "--chat", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [f"trace: recording prompt {i}/3" in err for i in (1, 2, 3)] == [True] * 3
    assert RoutingTrace.load(out).request.max() == 2


def test_chat_file_and_its_old_spelling_record_the_same(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    assert main([*TINY, "--chat-file", str(tmp_path / "c.jsonl"), "--out", str(new)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*TINY, "--chat", str(tmp_path / "c.jsonl"), "--out", str(old)]) == 0
    assert "--chat FILE.jsonl is now --chat-file" in capsys.readouterr().err
    assert (RoutingTrace.load(new).ids == RoutingTrace.load(old).ids).all()


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "p.txt", "--chat", "c.jsonl"], "--prompts and --chat-file (or the old --chat FILE)"),
    (["--prompts", "p.txt", "--chat", "--raw"], "--chat (the chat template) and --raw"),
    ([], "--model needs --prompts FILE or --chat-file FILE.jsonl"),
])
def test_contradictory_prompt_flags_are_one_error(argv, message, capsys):
    rc = main([*TINY, *argv, "--out", "x.npz"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
