"""JSON nested deeper than Python's stack in a file fastema reads (a damaged or forged header): the
reader's own refusal naming the file, never a bare RecursionError."""
import pytest

from fastema import _callback_files

DEEP = "[" * 200_000 + "]" * 200_000


def test_a_callback_state_file_with_a_deep_header_is_refused_as_damaged(tmp_path):
    """transformers' EMACallback reads its file's "ema" header with json.loads, and caught KeyError and
    ValueError only: a header nested past the stack escaped as RecursionError."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    path = tmp_path / "fastema_ema.safetensors"
    save_file({"x": torch.ones(1)}, str(path), metadata={"format": _callback_files.FORMAT,
                                                         "version": str(_callback_files.VERSION), "ema": DEEP})
    with pytest.raises(ValueError, match=r"fastema_ema\.safetensors.* has no readable EMA header .*damaged"):
        _callback_files.read(str(path))


def test_a_trainer_state_with_a_deep_header_gives_the_folders_step(tmp_path):
    """A merge input's trainer_state.json is read for its global_step, else the folder's name says it:
    JSON nested past the stack raised RecursionError out of the merge."""
    from fastema.merge import _safetensors_input

    folder = tmp_path / "checkpoint-300"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(DEEP)
    assert _safetensors_input.trainer_step(str(folder), "input 0") == 300
