"""Numbers read from text the user or another program wrote (file names, checkpoint metadata, saved
keys): a character that ``str.isdigit`` accepts but ``int`` refuses (``'²'``) is read as no number,
never a ``ValueError`` from deep inside a load (round 7, L4's siblings)."""
import os
import socket

from fastema._io.files import sweep_stale
from fastema.merge._safetensors_input import meta_step


def test_a_superscript_step_in_checkpoint_metadata_is_no_step():
    assert meta_step({"step": "²"}) is None
    assert meta_step({"step": " 12 "}) == 12


def test_a_stale_temporary_with_a_superscript_pid_is_left_alone(tmp_path):
    odd = tmp_path / f".out.²@{socket.gethostname()}.tmp"
    odd.write_text("x")
    sweep_stale(str(tmp_path), ".out.", (".tmp",))
    assert os.path.exists(odd)
