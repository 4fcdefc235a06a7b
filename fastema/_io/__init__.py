"""Checkpoint files: their formats and safe access to them, in one place.

The trust boundary is this folder: every file fastema reads (a post-hoc snapshot, a merge's input)
may come from anyone, and is read only through it: regular files only, reads bounded by the memory
free (:mod:`.safe_files`), safetensors headers checked against the file (:mod:`.safetensors`), DCP
metadata through the allow-list unpickler (:mod:`.dcp_unpickler`, the security boundary) and checked
by exact types (:mod:`.dcp`). Files are written whole or not at all (:mod:`.files`). Importing this
package imports nothing.
"""
